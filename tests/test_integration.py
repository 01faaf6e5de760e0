"""One federation, four launchers: 1 process, torchrun, mpiexec and srun must agree.

Roles are data: every rank derives the same sample and seeds every client's training from
(seed, round, client), and the fp64 aggregation is exact, so every launcher gives the same bits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    FAILING_PLUGIN,
    ROOT,
    SMOKE_CONFIG,
    assert_same_results,
    torchrun_command,
    unavailable,
    venv_tool,
)

from tapdist.checkpoint import load_state
from tapdist.config import load_config

pytestmark = pytest.mark.integration

TRAIN = ["-m", "tapdist", "train", str(SMOKE_CONFIG)]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def run(cmd: list[str], run_dir: Path, *extra: str, timeout: int = 300) -> Path:
    result = subprocess.run(
        [*cmd, "--run-dir", str(run_dir), *extra],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return run([sys.executable, *TRAIN], tmp_path_factory.mktemp("single") / "run")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = (
        load_state(run_dir / "final" / "global.h5"),
        load_state(reference / "final" / "global.h5"),
    )
    assert list(ours) == list(theirs)
    for name in theirs:
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-5, name
        assert torch.equal(ours[name], theirs[name]), f"{name}: fp64 aggregation is exact"
    got = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert (g["round"], g["sampled"], g["tensors_updated"]) == (
            w["round"],
            w["sampled"],
            w["tensors_updated"],
        )
        assert g["replacements"] == w["replacements"]
        for client, stats in w["clients"].items():
            values = {k: v for k, v in stats.items() if not k.endswith("_s") and k != "rank"}
            assert {k: g["clients"][client][k] for k in values} == pytest.approx(values, rel=1e-5)
    assert_same_results(run_dir, reference)
    same = ("run", "model", "federation", "train")
    ours_cfg, their_cfg = (load_config(d / "config.yaml").to_dict() for d in (run_dir, reference))
    assert {k: ours_cfg[k] for k in same} == {k: their_cfg[k] for k in same}


def torchrun_train(train: list[str] = TRAIN) -> list[str]:
    """`torchrun --nproc_per_node=3 -m tapdist train CONFIG` on a free port."""
    return torchrun_command(train)


def mpiexec_train() -> list[str]:
    """`mpiexec -n 3 python -m tapdist train SMOKE`, or skip (fail in CI) without MPI."""
    mpiexec = venv_tool("mpiexec")
    if mpiexec is None:
        unavailable("mpiexec not found: pip install 'tapdist[mpi-wheel]'")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        unavailable("mpi4py not installed: pip install 'tapdist[mpi-wheel]'")
    return [mpiexec, "-n", "3", sys.executable, *TRAIN]


def test_torchrun_matches_single_process(reference, tmp_path):
    assert_same_run(run(torchrun_train(), tmp_path / "run"), reference)
    ranks = {
        c["rank"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        for c in json.loads(line)["clients"].values()
    }
    assert ranks == {0, 1, 2}


@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_mpiexec_matches_single_process(reference, tmp_path, backend):
    cmd = mpiexec_train()
    assert_same_run(run(cmd, tmp_path / "run", "--set", f"dist.backend={backend}"), reference)


def test_srun_matches_single_process(reference, tmp_path, slurm_cluster):
    srun = [
        venv_tool("srun"),
        "-n",
        "3",
        "--overcommit",
        "--kill-on-bad-exit=1",
        "--time=10",
        sys.executable,
        *TRAIN,
    ]
    assert_same_run(run(srun, tmp_path / "run"), reference)


def test_sbatch_template_runs_the_same_federation(reference, tmp_path, slurm_cluster):
    out = tmp_path / "job.out"
    cmd = [
        venv_tool("sbatch"),
        "--wait",
        "--ntasks=3",
        "--overcommit",
        f"--output={out}",
        str(ROOT / "slurm" / "tapdist.sbatch"),
        str(SMOKE_CONFIG),
    ]
    env = dict(ENV, PYTHON=sys.executable)
    result = subprocess.run(
        [*cmd, "--run-dir", str(tmp_path / "run")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = out.read_text() if out.exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log}"
    assert "done in" in log
    assert_same_run(tmp_path / "run", reference)


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_a_failing_rank_ends_the_job_quickly_and_says_why(tmp_path, launcher):
    cmd = torchrun_train() if launcher == "torchrun" else mpiexec_train()
    plugin = [
        "--set",
        f"run.plugins=[{FAILING_PLUGIN}]",
        "--set",
        "federation.algorithm=fedavg_failing",
    ]  # client 4 raises; it lives on rank 1
    result = subprocess.run(
        [*cmd, "--run-dir", str(tmp_path / "run"), *plugin],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "tapdist (rank 1): unexpected error" in result.stderr
    assert "injected failure in client 4" in result.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_hdf5_federation_gives_the_same_results_under_torchrun(tmp_path):
    """A federation file (synthetic, both baselines' code paths): 1 process and torchrun -n 3
    write the same results.json, metrics and personal models."""
    spec = ROOT / "configs" / "federations" / "smoke.yaml"
    file = tmp_path / "smoke.h5"
    build = [sys.executable, "-m", "tapdist", "data", "build", str(spec), "--out", str(file)]
    subprocess.run(build, env=ENV, check=True, capture_output=True, timeout=120)
    train = ["-m", "tapdist", "train", str(ROOT / "configs" / "smoke_hdf5.yaml")]
    data = ("--set", f"data.path={file}")
    single = run([sys.executable, *train], tmp_path / "single", *data)
    multi = run(torchrun_train(train), tmp_path / "multi", *data)
    assert_same_results(multi, single)
    got, want = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (multi, single)
    )
    assert [x["algorithm"] for x in want] == ["tap"] * 3 + ["local"] * 3
    for g, w in zip(got, want):
        assert g.get("replacements") == w.get("replacements")
        for client, stats in w["clients"].items():
            values = {k: v for k, v in stats.items() if not k.endswith("_s") and k != "rank"}
            assert {k: g["clients"][client][k] for k in values} == pytest.approx(values, rel=1e-5)
    assert set(json.loads((single / "results.json").read_text())) == {
        "tap",
        "fedavg",
        "fedavg_ft",
        "local",
    }
