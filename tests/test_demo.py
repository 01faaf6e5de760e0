"""`tapdist demo`, smaller: TAP must beat FedAvg and Local on every task kind.

The demo federation (configs/federations/demo.yaml: MNIST, scikit-learn digits and BBC News
shipped in PyPI packages; the pretrained MiniLM-L6 text tower) and config, with fewer rounds and
local steps than `tapdist demo` runs (6 rounds of 4 steps, 6 stage-2 micro-batches, against 10,
6 and 8). Seeded: the run is deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from tapdist.checkpoint import load_states
from tapdist.evaluate import PRIMARY
from tapdist.results import kind_averages

pytestmark = pytest.mark.integration

SMALLER = ["federation.rounds=6", "train.local_steps=4", "tap.finetune_steps=6"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    overrides = [arg for item in SMALLER for arg in ("--set", item)]
    result = subprocess.run(
        [sys.executable, "-m", "tapdist", "demo", "--run-dir", str(run_dir), *overrides],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return run_dir, result


def test_tap_beats_fedavg_and_local_on_every_task_kind(demo_run):
    run_dir, _ = demo_run
    averages = kind_averages(json.loads((run_dir / "results.json").read_text()))
    assert set(averages["tap"]) == set(PRIMARY)  # all four task kinds
    for kind, (metric, direction) in PRIMARY.items():
        tap = averages["tap"][kind]
        for rival in ("fedavg", "local"):
            other = averages[rival][kind]
            better = tap > other if direction == "max" else tap < other
            assert better, f"{kind} {metric}: tap {tap:.4f} vs {rival} {other:.4f}"


def test_demo_writes_every_output(demo_run):
    run_dir, result = demo_run
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results) == ["tap", "fedavg", "fedavg_ft", "local"]
    clients = {str(c) for c in range(10)}
    assert all(set(per_client) == clients for per_client in results.values())
    assert "| image_cls · accuracy (%) ↑ |" in result.stdout  # the printed comparison
    groups = [g for p in (run_dir / "final").glob("personal-*.h5") for g in load_states(p)]
    assert sorted(groups) == sorted(f"client_{c}" for c in clients)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tap = [x for x in lines if x["algorithm"] == "tap"]
    assert len(tap) == 6
    assert set(tap[-1]["replacements_cumulative"]) == set(PRIMARY)
    assert sum(tap[-1]["replacements_cumulative"].values()) > 0
