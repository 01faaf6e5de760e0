"""`tapdist` from the command line: a whole run in-process, and bad input."""

import json
import subprocess
import sys

import pytest

from tapdist.checkpoint import load_state
from tapdist.cli import main
from tapdist.config import load_config


def test_train_writes_the_run_folder(standin_config, tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(standin_config),
                "--run-dir",
                str(run_dir),
                "--set",
                "federation.rounds=3",
            ]
        )
        == 0
    )
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.federation.rounds == 3
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2]
    for line in lines:
        assert len(line["sampled"]) == 4
        assert set(line["clients"]) == {str(c) for c in line["sampled"]}
        assert all(c["loss"] > 0 and c["samples"] > 0 for c in line["clients"].values())
    state = load_state(run_dir / "final" / "global.h5")
    assert set(state) == {
        "enc.image.weight",
        "enc.text.weight",
        "shared.weight",
        "head.cls.weight",
        "head.cls.bias",
        "head.gen.weight",
    }


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tapdist", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["train", "nowhere.yaml"], 2, ["config error", "nowhere.yaml does not exist"]),
        (["train", "{cfg}", "--set", "federation.rounds=-2"], 2, ["federation.rounds", ">= 0"]),
        (
            ["train", "{cfg}", "--set", "model.name=flava9"],
            1,
            ["no model named 'flava9'", "registered: standin"],
        ),
        (
            ["train", "{cfg}", "--set", "dist.server_hosts_clients=false"],
            1,
            ["no rank can host clients"],
        ),
        (
            [
                "train",
                "{cfg}",
                "--set",
                "federation.clients=9",
                "--set",
                "model.name=standin",
                "--set",
                "run.plugins=[nothere.py]",
            ],
            1,
            ["plugin file", "nothere.py does not exist"],
        ),
        (
            ["train", "{cfg}", "--set", "dist.launcher=slurm"],
            1,
            ["dist.launcher = slurm", "SLURM_PROCID"],
        ),
    ],
)
def test_bad_input_exits_nonzero_with_a_clear_message(standin_config, tmp_path, args, code, words):
    args = [a.replace("{cfg}", str(standin_config)) for a in args]
    result = run_cli(*args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == code, result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_config_and_models_commands(standin_config):
    shown = run_cli("config", str(standin_config), "--set", "federation.rounds=9")
    assert shown.returncode == 0 and "rounds: 9" in shown.stdout
    listed = run_cli("models", "--plugin", str(standin_config.parent.parent / "standin.py"))
    assert "standin" in listed.stdout and "fedavg" in listed.stdout
