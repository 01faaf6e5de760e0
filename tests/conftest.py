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


@pytest.fixture
def smoke_config() -> Path:
    return SMOKE_CONFIG
