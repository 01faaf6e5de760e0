"""tapdist: a distributed runtime for TAP (Two-Stage Adaptive Personalization)."""

__version__ = "0.1.0"
