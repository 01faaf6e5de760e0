"""How errors reach the user: a one-line message and an exit code for bad input, a traceback
for anything else.

Exit codes: 2 when the input is wrong (the config, a data or model file, the launch
environment: fix it and run again), 1 when the run failed (a rank stopped or a collective timed
out, or a bug). A rank that stops because another one failed takes that rank's code.
"""

from __future__ import annotations

import os
import sys
import traceback

from tapdist.config import ConfigError
from tapdist.data import DataError
from tapdist.dist import DistError, LaunchError
from tapdist.fl.topology import TopologyError
from tapdist.registry import RegistryError
from tapdist.resources import ResourceError


class PeerFailed(RuntimeError):
    """Another rank failed while the run was being prepared: that rank reports the cause, and
    this one stops too, before anything is written, with the same exit code."""

    def __init__(self, ranks: list[int], code: int):
        self.ranks, self.code = ranks, code
        which = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
        super().__init__(
            f"{which} failed before the run started (its own message gives the cause); "
            "nothing was written"
        )


class Reported(RuntimeError):
    """This rank's error, already reported on stderr; the process ends with ``code``."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"reported above (exit code {code})")


#: Errors caused by the config, the data, the launch environment or the cluster, not by a bug.
USER_ERRORS = (
    ConfigError,
    DataError,
    ResourceError,
    DistError,
    LaunchError,
    TopologyError,
    RegistryError,
    PeerFailed,
)

_KINDS = {ConfigError: "config error", DataError: "data error", LaunchError: "launch error"}


def exit_code(err: BaseException) -> int:
    """2 for bad input, 1 for a failed run or a bug (see the module docstring)."""
    if isinstance(err, (PeerFailed, Reported)):
        return err.code
    if isinstance(err, LaunchError):  # before DistError: a device problem is both
        return 2
    if isinstance(err, USER_ERRORS) and not isinstance(err, DistError):
        return 2
    return 1


def debug_enabled() -> bool:
    """``tapdist --debug`` (or ``TAPDIST_DEBUG=1`` in every rank's environment): tracebacks for
    user errors too."""
    return os.environ.get("TAPDIST_DEBUG", "") not in ("", "0")


def report(err: BaseException, rank: int | None = None) -> None:
    """Print ``err`` to stderr: its message if it is a user error, else the full traceback."""
    where = f" (rank {rank})" if rank is not None else ""
    if isinstance(err, USER_ERRORS):
        kind = next((k for t, k in _KINDS.items() if isinstance(err, t)), "error")
        if isinstance(err, PeerFailed):
            kind = "stopped"
        if debug_enabled():
            traceback.print_exception(err, file=sys.stderr)
        print(f"tapdist{where}: {kind}: {err}", file=sys.stderr)
    else:
        print(f"tapdist{where}: unexpected error", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
    sys.stderr.flush()
