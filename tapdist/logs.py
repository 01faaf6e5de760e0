"""Rank-aware logging: the server speaks, other ranks only warn unless asked."""

from __future__ import annotations

import logging
import sys


def setup_logging(
    rank: int, world_size: int, level: str = "info", all_ranks: bool = False, is_server: bool = True
) -> None:
    """Log to stderr with the rank in every line; non-server ranks log warnings and errors."""
    chosen = getattr(logging, level.upper())
    if not (is_server or all_ranks):
        chosen = max(chosen, logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    width = len(str(world_size - 1))
    handler.setFormatter(
        logging.Formatter(
            f"[tapdist r{rank:0{width}d} %(asctime)s] %(levelname)s %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger("tapdist")
    root.handlers[:] = [handler]
    root.setLevel(chosen)
    root.propagate = False
