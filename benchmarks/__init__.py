"""Benchmark scripts of tapdist: each runs as `python -m benchmarks.NAME` (see README.md)."""
