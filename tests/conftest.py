"""Shared test setup: offline hub, the smoke federation, and launcher availability."""

from __future__ import annotations

import os
import shutil
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
