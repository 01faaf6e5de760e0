"""Rules of the code base that keep the distributed seam in one place."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tapdist"
COLLECTIVES = re.compile(r"^\s*(import|from)\s+(torch\.distributed|mpi4py)\b|torch\.distributed\.")


def test_only_the_dist_package_talks_to_other_processes():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "dist":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if COLLECTIVES.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "collectives outside tapdist/dist/:\n" + "\n".join(offenders)


def test_the_seam_test_would_catch_an_offender():
    assert COLLECTIVES.search("import torch.distributed as dist")
    assert COLLECTIVES.search("    from mpi4py import MPI")
    assert COLLECTIVES.search("x = torch.distributed.all_reduce(t)")
    assert not COLLECTIVES.search("from tapdist.dist import init_context")
