"""The demo as a batch job: TAP must beat FedAvg and Local on every task kind.

The demo federation (configs/federations/demo.yaml: MNIST, scikit-learn digits and BBC News
shipped in PyPI packages; the pretrained MiniLM-L6 text tower) and configs/demo.yaml as they
are, submitted with slurm/one_node.sbatch to the local Slurm cluster as three ranks on the CPU:
about 5 minutes on 2 cores (`-m "not slow"` leaves it out). Seeded: the run is deterministic.
"""

from __future__ import annotations

import json

import pytest
from test_slurm import ENDED, sbatch

from tapdist.checkpoint import load_states
from tapdist.config import load_config
from tapdist.data.build import build_federation
from tapdist.demo import DEMO_CONFIG, DEMO_SPEC
from tapdist.evaluate import PRIMARY
from tapdist.results import kind_averages

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

# Three ranks on this node's CPU (gloo), more ranks than cores.
JOB = ["--ntasks=3", "--gpus-per-node=0", "--cpus-per-task=1", "--overcommit", "--time=40"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    federation = root / "federation.h5"
    build_federation(DEMO_SPEC, federation, progress=False)
    run_dir = root / "run"
    train = ["--run-dir", run_dir, "--set", f"data.path={federation}"]
    job = sbatch("one_node", JOB, DEMO_CONFIG, *train, log=root / "job.out")
    try:
        info = job.wait(timeout=2400)
    finally:
        if job.info().get("JobState") not in ENDED:
            job.cancel()
    output = job.assert_completed(info)
    return run_dir, output


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
    run_dir, output = demo_run
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results) == ["tap", "fedavg", "fedavg_ft", "local"]
    clients = {str(c) for c in range(10)}
    assert all(set(per_client) == clients for per_client in results.values())
    assert "on 3 ranks (slurm, gloo on cpu)" in output
    assert "| image_cls · accuracy (%) ↑ |" in output  # the printed comparison
    groups = [g for p in (run_dir / "final").glob("personal-*.h5") for g in load_states(p)]
    assert sorted(groups) == sorted(f"client_{c}" for c in clients)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tap = [x for x in lines if x["algorithm"] == "tap"]
    assert len(tap) == load_config(DEMO_CONFIG).federation.rounds
    assert set(tap[-1]["replacements_cumulative"]) == set(PRIMARY)
    assert sum(tap[-1]["replacements_cumulative"].values()) > 0
