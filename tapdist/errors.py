"""How errors reach the user: a one-line message and an exit code for bad input, a traceback
for anything else."""

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

#: Errors caused by the config, the launch environment or the cluster, not by a bug.
USER_ERRORS = (
    ConfigError,
    DataError,
    ResourceError,
    DistError,
    LaunchError,
    TopologyError,
    RegistryError,
)


def exit_code(err: BaseException) -> int:
    return 2 if isinstance(err, (ConfigError, DataError, ResourceError)) else 1


def debug_enabled() -> bool:
    """``tapdist --debug`` (or ``TAPDIST_DEBUG=1`` in every rank's environment): tracebacks for
    user errors too."""
    return os.environ.get("TAPDIST_DEBUG", "") not in ("", "0")


def report(err: BaseException, rank: int | None = None) -> None:
    """Print ``err`` to stderr: its message if it is a user error, else the full traceback."""
    where = f" (rank {rank})" if rank is not None else ""
    if isinstance(err, USER_ERRORS):
        kind = {ConfigError: "config error", DataError: "data error"}.get(type(err), "error")
        if debug_enabled():
            traceback.print_exception(err, file=sys.stderr)
        print(f"tapdist{where}: {kind}: {err}", file=sys.stderr)
    else:
        print(f"tapdist{where}: unexpected error", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
    sys.stderr.flush()
