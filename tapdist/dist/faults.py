"""A testing aid: make one rank die or hang after a chosen round, to check that the other ranks
end the job within ``dist.timeout_s`` and name the rank that is missing.

Set ``TAPDIST_FAULT=RANK:ROUND:ACTION`` in the environment of every rank: after round ROUND
(0-based, of any algorithm) has been aggregated, rank RANK either dies at once (``die``: SIGKILL,
as the kernel's out-of-memory killer or a node failure would end it) or stops making progress
(``hang``: sleeps until the launcher kills it). Unset, which is how every real run goes, it does
nothing. ``tests/test_faults.py`` uses it under mpiexec and srun.
"""

from __future__ import annotations

import os
import signal
import sys
import time

VARIABLE = "TAPDIST_FAULT"
ACTIONS = ("die", "hang")


def parse_fault(value: str) -> tuple[int, int, str] | None:
    """(rank, round, action) of a ``TAPDIST_FAULT`` value; None for an empty one."""
    if not value:
        return None
    parts = value.split(":")
    numbers = len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit()
    if not numbers or parts[2] not in ACTIONS:
        raise ValueError(
            f"{VARIABLE}={value!r}: expected RANK:ROUND:ACTION with ACTION one of "
            f"{', '.join(ACTIONS)}, e.g. 1:0:hang; unset it for a normal run"
        )
    return int(parts[0]), int(parts[1]), parts[2]


def inject_fault(rank: int, round_index: int) -> None:
    """Die or hang here when ``TAPDIST_FAULT`` names this rank and round."""
    fault = parse_fault(os.environ.get(VARIABLE, ""))
    if fault is None or fault[:2] != (rank, round_index):
        return
    what = f"tapdist (rank {rank}): {VARIABLE}: {fault[2]} after round {round_index}"
    print(what, file=sys.stderr)
    sys.stderr.flush()
    if fault[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)
