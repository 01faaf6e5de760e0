"""Checkpoints: a run split over several jobs, resumed at another world size, or interrupted
mid-checkpoint gives the results of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import SMOKE_CONFIG, TESTS, torchrun_command

import tapdist.train
from tapdist.checkpoint import load_state, load_states, save_states
from tapdist.cli import main
from tapdist.config import ConfigError, load_config
from tapdist.fl.checkpoints import Checkpoint, CheckpointDamaged
from tapdist.models.federated import TapFederation
from tapdist.registry import ALGORITHMS, load_builtins
from tapdist.train import Resume, _restore, train

DYING_PLUGIN = TESTS / "plugins" / "dying.py"
PREEMPTED_PLUGIN = TESTS / "plugins" / "preempted.py"
# TAP then Local, so checkpoints hold personal models, Local's models and finished results
SETTINGS = ["federation.baselines=[local]", "run.checkpoint_every=1", "tap.finetune_steps=2"]


def run_cli(run_dir, *extra, resume=False):
    args = ["train", str(SMOKE_CONFIG), *(a for s in SETTINGS for a in ("--set", s))]
    where = ["--resume", str(run_dir)] if resume else ["--run-dir", str(run_dir)]
    assert main([*args, *where, *extra]) == 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    run_cli(run_dir)
    return run_dir


def assert_same_outcome(run_dir, reference, algorithms=("tap", "local")):
    """Same results, final global and personal states (bit for bit), and metrics rounds."""
    got, want = (json.loads((d / "results.json").read_text()) for d in (run_dir, reference))
    assert got == want
    ours, theirs = (load_state(d / "final" / "global.h5") for d in (run_dir, reference))
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)

    def personal(d):
        return {
            g: s for p in (d / "final").glob("personal-*.h5") for g, s in load_states(p).items()
        }

    mine, want = personal(run_dir), personal(reference)
    assert sorted(mine) == sorted(want)
    assert all(torch.equal(mine[c][n], want[c][n]) for c in want for n in want[c])
    rounds = [
        (x["algorithm"], x["round"])
        for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    ]
    assert rounds == [(a, r) for a in algorithms for r in range(3)]


def test_a_run_split_over_jobs_equals_the_whole_run(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=2")  # tap rounds 0-1
    assert not (run_dir / "results.json").exists()
    run_cli(run_dir, "--set", "run.rounds_per_job=2", resume=True)  # tap round 2, local 0
    run_cli(run_dir, "--set", "run.rounds_per_job=2", resume=True)  # local 1-2, results
    assert_same_outcome(run_dir, uninterrupted)
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["1-local-round000002", "1-local-round000003"]  # run.keep_checkpoints = 2


def test_a_half_written_checkpoint_is_never_loaded(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=2")
    torn = run_dir / "checkpoints" / "0-tap-round000003"  # newer, but its manifest is missing
    shutil.copytree(run_dir / "checkpoints" / "0-tap-round000002", torn)
    (torn / "MANIFEST.json").unlink()
    (torn / "global.h5").write_bytes(b"torn")
    run_cli(run_dir, resume=True)
    assert_same_outcome(run_dir, uninterrupted)


def test_client_files_of_ranks_the_job_did_not_have_are_never_read(tmp_path, uninterrupted):
    """A checkpoint folder may hold files an earlier, larger job left there; only the files
    of the ranks of the job that wrote the manifest count."""
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=2")
    folder = run_dir / "checkpoints" / "0-tap-round000002"
    assert json.loads((folder / "MANIFEST.json").read_text())["world_size"] == 1
    kept = load_states(folder / "clients-rank0000.h5")
    stray = {g: {k: torch.zeros_like(v) for k, v in s.items()} for g, s in kept.items() if s}
    assert stray
    save_states(folder / "clients-rank0001.h5", stray)
    run_cli(run_dir, resume=True)
    assert_same_outcome(run_dir, uninterrupted)


def test_a_new_run_refuses_a_folder_holding_an_earlier_runs_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=1")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run"):
        train(load_config(SMOKE_CONFIG, SETTINGS), run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_restored_global_state_lands_on_the_runs_device(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=1")
    cfg = load_config(SMOKE_CONFIG, SETTINGS)
    folder = run_dir / "checkpoints" / "0-tap-round000001"
    start = Checkpoint(folder, json.loads((folder / "MANIFEST.json").read_text()))
    start = Resume(start, start.global_state(), start.client_states({0, 1}))
    model = TapFederation(cfg, torch.device("cpu"))
    load_builtins()
    meta = torch.device("meta")  # stands in for a GPU: anything but where the file is read
    _, state = _restore(start, ALGORITHMS.get("tap")(cfg, model), meta)
    assert state and all(t.device == meta for t in state.values())


def files_of(run_dir) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_damaged_checkpoint_stops_the_resume_before_anything_changes(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=2")
    newest = run_dir / "checkpoints" / "0-tap-round000002"
    manifest = (newest / "MANIFEST.json").read_text()
    cfg = load_config(SMOKE_CONFIG, SETTINGS)
    hint = "Delete .*0-tap-round000002 to resume from 0-tap-round000001"

    def refused(match: str) -> None:
        before = files_of(run_dir)
        with pytest.raises(CheckpointDamaged, match=match):
            train(cfg, run_dir, resume=True)
        assert files_of(run_dir) == before  # metrics.jsonl not trimmed, nothing written

    ranks = newest / "clients-rank0000.h5"
    ranks.rename(tmp_path / "kept.h5")  # a rank's file lost (a node-local disk, say)
    refused(f"clients-rank0000.h5.*{hint}")
    (tmp_path / "kept.h5").rename(ranks)
    whole = (newest / "global.h5").read_bytes()
    (newest / "global.h5").write_bytes(whole[:4000])  # cut short
    refused(f"global.h5.*{hint}")
    (newest / "global.h5").write_bytes(whole)
    for edited in ("{not json", json.dumps({**json.loads(manifest), "config": None}), "[1, 2]"):
        (newest / "MANIFEST.json").write_text(edited)
        refused(f"MANIFEST.json.*{hint}")
    (newest / "MANIFEST.json").write_text(manifest)
    train(cfg, run_dir, resume=True)  # repaired: it resumes


def test_a_copy_of_a_checkpoint_folder_is_neither_read_nor_pruned(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=1")
    backup = run_dir / "checkpoints" / "0-tap-round000001.bak"
    shutil.copytree(run_dir / "checkpoints" / "0-tap-round000001", backup)
    run_cli(run_dir, resume=True)
    assert_same_outcome(run_dir, uninterrupted)
    assert (backup / "MANIFEST.json").exists()


def test_a_finished_algorithm_is_not_run_again_by_the_next_job(tmp_path, uninterrupted, capsys):
    """With run.rounds_per_job = the rounds, the first job ends TAP (its post-FL stage too)
    and stops before Local; its last checkpoint carries TAP's results, so the second job
    starts with Local."""
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=3")
    manifest = json.loads((run_dir / "checkpoints/0-tap-round000003/MANIFEST.json").read_text())
    assert manifest["finished"] and {"tap", "fedavg", "fedavg_ft"} <= set(manifest["results"])
    capsys.readouterr()
    # with the config the run folder keeps, as the docs advise
    assert main(["train", str(run_dir / "config.yaml"), "--resume", str(run_dir)]) == 0
    said = capsys.readouterr().err
    assert "tap post-FL" not in said and "tap rounds" not in said and "local rounds 1/3" in said
    assert_same_outcome(run_dir, uninterrupted)


def test_a_stop_in_the_last_round_comes_before_the_post_fl_stage(tmp_path):
    """SIGTERM in the last round: the job stops with that round's checkpoint instead of
    running the post-FL stage past the scheduler's grace period; --resume finishes."""
    two = ["--set", "federation.rounds=2", "--set", "federation.baselines=[]"]
    reference, run_dir = tmp_path / "whole", tmp_path / "run"
    run_cli(reference, *two)
    preempted = ["--set", f"run.plugins=[{PREEMPTED_PLUGIN}]"]
    run_cli(run_dir, *two, *preempted, "--set", "federation.algorithm=tap_preempted")
    assert not (run_dir / "results.json").exists()
    manifest = run_dir / "checkpoints" / "0-tap_preempted-round000002" / "MANIFEST.json"
    assert not json.loads(manifest.read_text()).get("finished")
    resume = [*two, *preempted, "--set", "federation.algorithm=tap_preempted"]
    run_cli(run_dir, *resume, resume=True)
    results = [json.loads((d / "results.json").read_text()) for d in (run_dir, reference)]
    assert results[0] == results[1]


def test_overwrite_starts_over_and_leaves_nothing_of_the_earlier_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "federation.rounds=1", "--set", "run.tensorboard=false")
    assert (run_dir / "results.json").exists() and (run_dir / "final" / "global.h5").exists()
    mine = [run_dir / "checkpoints" / "other" / "model.pt", run_dir / "final" / "notes.txt"]
    for path in mine:  # not tapdist's: they stay
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    for folder in (run_dir / "checkpoints").glob("*-round*"):
        shutil.rmtree(folder)
    before = files_of(run_dir)
    with pytest.raises(ConfigError, match=r"outputs of an earlier run \(.*--overwrite"):
        train(load_config(SMOKE_CONFIG, SETTINGS), run_dir)  # no checkpoints, but results
    assert files_of(run_dir) == before
    # a launcher restart of an --overwrite job starts over unless the checkpoint is its own
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    run_cli(run_dir, "--overwrite", "--set", "run.rounds_per_job=1", "--set", "run.seed=7")
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == ["checkpoints", "config.yaml", "final", "metrics.jsonl"]  # no results of 41
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "0-tap-round000001",
        "other",
    ]
    assert [p.name for p in (run_dir / "final").iterdir()] == ["notes.txt"]
    assert load_config(run_dir / "config.yaml").run.seed == 7
    manifest = run_dir / "checkpoints" / "0-tap-round000001" / "MANIFEST.json"
    assert json.loads(manifest.read_text())["job"] == "torchrun:job-2"
    with pytest.raises(ConfigError, match="give one"):
        train(load_config(SMOKE_CONFIG, SETTINGS), run_dir, resume=True, overwrite=True)


def test_a_run_folder_another_run_holds_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = {"host": socket.gethostname(), "pid": os.getppid(), "job": "", "since": "now"}
    (run_dir / ".lock").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"in use by another run \(process"):
        train(load_config(SMOKE_CONFIG, SETTINGS), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    (run_dir / ".lock").write_text(json.dumps({**other, "pid": 2**22 + 1}))  # a process gone
    run_cli(run_dir, "--set", "federation.rounds=1", "--set", "federation.baselines=[]")
    assert not (run_dir / ".lock").exists()  # released at the end


def test_ctrl_c_names_the_way_on_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=1")
    capsys.readouterr()
    monkeypatch.setattr(tapdist.train, "_train", interrupted)
    for where, said in (
        (tmp_path / "new", "interrupted; no checkpoint was written yet: start the run again"),
        (run_dir, "continue from the newest checkpoint (0-tap-round000001) with `tapdist"),
    ):
        with pytest.raises(SystemExit) as stopped:
            train(load_config(SMOKE_CONFIG, SETTINGS), where)
        assert stopped.value.code == 130
        assert said in capsys.readouterr().err


def test_resuming_refuses_a_changed_config_and_a_run_without_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    run_cli(run_dir, "--set", "run.rounds_per_job=1")
    cfg = load_config(SMOKE_CONFIG, [*SETTINGS, "train.lr=0.01"])
    with pytest.raises(ConfigError, match=r"the config changed \(train.lr\)"):
        train(cfg, run_dir, resume=True)
    cfg = load_config(SMOKE_CONFIG, [*SETTINGS, "dist.transport_dtype=fp32"])
    with pytest.raises(ConfigError, match=r"the config changed \(dist.transport_dtype\)"):
        train(cfg, run_dir, resume=True)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(load_config(SMOKE_CONFIG, SETTINGS), tmp_path / "empty", resume=True)


ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def train_args(*overrides: str) -> list[str]:
    """`-m tapdist train SMOKE` with SETTINGS and ``overrides`` (section.key=value)."""
    return ["-m", "tapdist", "train", str(SMOKE_CONFIG)] + [
        a for s in (*SETTINGS, *overrides) for a in ("--set", s)
    ]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` with one intra-op thread (so every part of a run computes the same bits)."""
    done = subprocess.run(cmd, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.integration
def test_a_run_resumed_at_another_world_size_equals_the_whole_run(tmp_path):
    """Rounds 0-1 of TAP under torchrun -n 3, the rest as one process, against one process
    throughout; all with one intra-op thread, so the bits agree."""
    train = train_args()
    run_dir, reference = tmp_path / "run", tmp_path / "whole"
    run_ok([sys.executable, *train, "--run-dir", str(reference)])
    run_ok([*torchrun_command(train), "--run-dir", str(run_dir), "--set", "run.rounds_per_job=2"])
    run_ok([sys.executable, *train, "--resume", str(run_dir)])
    assert_same_outcome(run_dir, reference)


@pytest.mark.integration
def test_a_rank_killed_mid_round_restarts_and_ends_as_the_whole_run(tmp_path):
    """torchrun --max-restarts=1: the rank hosting client 2 dies (SIGKILL) in round 2; the
    restarted job resumes from the round-2 checkpoint and ends as an uninterrupted run."""
    train = train_args()
    dying = ["--set", f"run.plugins=[{DYING_PLUGIN}]", "--set", "federation.algorithm=tap_dying"]
    run_dir, reference = tmp_path / "run", tmp_path / "whole"
    run_ok([sys.executable, *train, "--run-dir", str(reference)])
    torchrun = torchrun_command(train, "--max-restarts=1")
    done = run_ok([*torchrun, "--run-dir", str(run_dir), *dying])
    assert "resuming from" in done.stderr and "0-tap_dying-round000002" in done.stderr
    assert_same_outcome(run_dir, reference, algorithms=("tap_dying", "local"))


@pytest.mark.integration
def test_sigterm_on_one_rank_checkpoints_and_ends_the_job_cleanly(tmp_path):
    """One rank of three gets SIGTERM in round 1: every rank stops after that round with a
    checkpoint and exit code 0, and --resume ends as an uninterrupted run."""
    train = train_args(f"run.plugins=[{PREEMPTED_PLUGIN}]")
    preempted = ["--set", "federation.algorithm=tap_preempted"]
    run_dir, reference = tmp_path / "run", tmp_path / "whole"
    run_ok([sys.executable, *train, "--run-dir", str(reference)])
    done = run_ok([*torchrun_command(train), "--run-dir", str(run_dir), *preempted])
    assert "stopped by a stop signal" in done.stderr
    assert not (run_dir / "results.json").exists()
    assert (run_dir / "checkpoints" / "0-tap_preempted-round000002" / "MANIFEST.json").exists()
    run_ok([sys.executable, *train, *preempted, "--resume", str(run_dir)])
    assert_same_outcome(run_dir, reference, algorithms=("tap_preempted", "local"))
