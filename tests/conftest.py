"""Shared test setup: offline hub, the smoke federation, and launcher availability."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SMOKE_CONFIG = ROOT / "configs" / "smoke.yaml"
FAILING_PLUGIN = TESTS / "plugins" / "failing.py"
# CI sets this so that a missing launcher (mpiexec, srun) fails the suite instead of skipping.
REQUIRE_LAUNCHERS = os.environ.get("TAPDIST_REQUIRE_LAUNCHERS") == "1"

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def unavailable(reason: str) -> None:
    """Skip, or fail where every launcher is required (CI)."""
    if REQUIRE_LAUNCHERS:
        pytest.fail(f"required launcher missing: {reason}")
    pytest.skip(reason)


def venv_tool(name: str) -> str | None:
    """A tool beside this interpreter (a venv's mpiexec, torchrun), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def torchrun_command(module_args: list[str], *launcher_flags: str) -> list[str]:
    """`torchrun --nproc_per_node=3 [FLAGS] -m MODULE_ARGS...` with a static rendezvous on a
    free local port; ``module_args`` start with ``-m``."""
    from tapdist.dist.launch import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=3",
        *launcher_flags,
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *module_args[1:],
    ]


@pytest.fixture
def smoke_config() -> Path:
    return SMOKE_CONFIG


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local single-node Slurm cluster (slurm/local_cluster.sh), started once per session."""
    start_slurm_cluster()


def start_slurm_cluster() -> None:
    """Bring the local Slurm cluster up (idempotent), or skip where Slurm is missing."""
    if venv_tool("srun") is None:
        unavailable("srun not found: apt-get install slurm-wlm munge")
    up = subprocess.run(
        ["bash", str(ROOT / "slurm" / "local_cluster.sh"), "up"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode == 3:
        unavailable(up.stderr.strip() or "slurm/munge binaries missing")
    assert up.returncode == 0, f"local Slurm cluster did not start:\n{up.stdout}\n{up.stderr}"


def assert_same_results(run_dir: Path, reference: Path) -> None:
    """results.json within 1e-4, and every client's personal model saved exactly once."""
    from tapdist.checkpoint import load_states

    got, want = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert list(got) == list(want)
    for method, clients in want.items():
        assert list(got[method]) == list(clients)
        for client, tasks in clients.items():
            for task, entry in tasks.items():
                mine = got[method][client][task]
                assert mine["kind"] == entry["kind"] and mine["primary"] == entry["primary"]
                for metric, value in entry.items():
                    if metric not in ("kind", "primary"):
                        assert mine[metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (
                            method,
                            client,
                            task,
                            metric,
                        )
    groups = [
        group
        for path in sorted((run_dir / "final").glob("personal-*.h5"))
        for group in load_states(path)
    ]
    assert sorted(groups) == sorted(f"client_{c}" for c in want["tap"])
