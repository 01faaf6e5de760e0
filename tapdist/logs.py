"""Rank-aware logging: the server speaks, other ranks only warn unless asked."""

from __future__ import annotations

import logging
import shutil
import sys
import time


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


class Progress:
    """Progress of a long phase on the server: a bar redrawn in place on a terminal, one log
    line per step otherwise (batch jobs, CI logs)."""

    def __init__(self, label: str, total: int, enabled: bool = True, width: int = 24):
        self.label, self.total, self.enabled, self.width = label, total, enabled, width
        self.done = 0
        self.started = time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()

    def __enter__(self) -> Progress:
        return self

    def step(self, message: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        if not self.tty:
            logging.getLogger("tapdist").info(
                "%s %d/%d (%.1fs): %s", self.label, self.done, self.total, elapsed, message
            )
            return
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.0f}s {message}"
        columns = shutil.get_terminal_size((120, 20)).columns
        sys.stderr.write("\r" + line[: columns - 1].ljust(columns - 1))
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.tty and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()
