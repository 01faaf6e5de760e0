"""Federated learning: aggregation, placement and sampling, algorithms, the round loop."""
