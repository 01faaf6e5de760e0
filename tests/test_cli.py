"""`tapdist` from the command line: a whole run in-process, and bad input."""

import json
import os
import subprocess
import sys

import pytest
from conftest import FAILING_PLUGIN, SMOKE_CONFIG

from tapdist.checkpoint import load_state, load_states
from tapdist.cli import main
from tapdist.config import load_config

SMOKE_HDF5 = SMOKE_CONFIG.parent / "smoke_hdf5.yaml"


def test_train_writes_the_run_folder(smoke_config, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", str(smoke_config), "--run-dir", str(run_dir), "--set", "federation.rounds=2"]
    assert main(args) == 0
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.federation.rounds == 2
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1]
    for line in lines:
        assert len(line["sampled"]) == 3
        assert set(line["clients"]) == {str(c) for c in line["sampled"]}
        for c in line["clients"].values():
            losses = [v for k, v in c.items() if k.startswith(("global_loss.", "personal_loss."))]
            assert losses and all(v > 0 for v in losses) and c["samples"] > 0
        assert set(line["replacements"]) == {"image_cls", "text_cls", "image_gen", "text_gen"}
    state = load_state(run_dir / "final" / "global.h5")
    assert any(n.startswith("heads.vqa.") for n in state)
    assert not any("fusion" in n for n in state)  # frozen weights are never saved
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results) == ["tap", "fedavg", "fedavg_ft"]
    assert set(results["tap"]) == {str(c) for c in range(5)}
    assert results["tap"]["4"]["law_qa"]["kind"] == "text_gen"
    personal = load_states(run_dir / "final" / "personal-rank0000.h5")
    assert sorted(personal) == [f"client_{c}" for c in range(5)]
    assert "| text_gen" in (run_dir / "results.md").read_text()


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tapdist", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


BAD_INPUT = [
    (["nowhere.yaml"], 2, ["config error", "nowhere.yaml does not exist"]),
    (["{tmp}"], 2, ["config error", "is a directory; give the YAML file in it"]),
    (["{latin1}"], 2, ["config error", "latin1.yaml is not UTF-8 text", "save it as UTF-8"]),
    (["{cfg}", "--set", "federation.rounds=-2"], 2, ["federation.rounds", ">= 0"]),
    (["{cfg}", "--set", "model.name=flava9"], 2, ["no model named 'flava9'", "registered: tap"]),
    (["{cfg}", "--set", "dist.server_hosts_clients=false"], 2, ["no rank can host clients"]),
    (["{cfg}", "--set", "run.plugins=[nothere.py]"], 2, ["plugin file", "nothere.py does not"]),
    (["{cfg}", "--set", "dist.launcher=slurm"], 2, ["dist.launcher = slurm", "SLURM_PROCID"]),
    (["{cfg}", "--set", "federation.clients=4"], 2, ["5 clients", "federation.clients = 4"]),
    (["{cfg}", "--set", "model.paths=[mod_task, sideways]"], 2, ["model.paths", "sideways"]),
    (
        ["{cfg}", "--set", "model.backbone=vilt", "--set", "data.text_len=64"],
        2,
        ["data.text_len = 64", "40 positions"],
    ),
    (["{cfg}", "--set", "model.pretrained=missing"], 2, ["model.pretrained", "no such directory"]),
    (["{cfg}", "--set", "model.pretrained={tmp}"], 2, ["holds no config.json", "save_pretrained"]),
    (["{cfg}", "--set", "model.pretrained={bert}"], 2, ["holds a 'bert' model", "flava"]),
    (["{cfg}", "--set", "data.source=hdf5"], 2, ["data.path", "tapdist data build"]),
    (
        ["{cfg}", "--set", "data.source=hdf5", "--set", "data.path=none.h5"],
        2,
        ["none.h5", "federation file not found", "tapdist data build"],
    ),
]


@pytest.mark.parametrize("args, code, words", BAD_INPUT)
def test_bad_input_exits_nonzero_with_a_clear_message(smoke_config, tmp_path, args, code, words):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "latin1.yaml").write_bytes("run: {name: caf\u00e9}\n".encode("latin-1"))
    places = {
        "{cfg}": smoke_config,
        "{tmp}": tmp_path,
        "{bert}": tmp_path / "bert",
        "{latin1}": tmp_path / "latin1.yaml",
    }
    for key, value in places.items():
        args = [a.replace(key, str(value)) for a in args]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("an earlier run's metrics\n")
    result = run_cli("train", *args, "--run-dir", str(run_dir), cwd=tmp_path)
    assert result.returncode == code, result.stderr
    for word in words:
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "final").exists()
    assert (run_dir / "metrics.jsonl").read_text() == "an earlier run's metrics\n"  # untouched


def test_bad_task_and_client_specs_name_the_entry(smoke_config, tmp_path):
    text = smoke_config.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("kind: text_cls", "kind: text_classify"))
    result = run_cli("train", str(bad), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "data.tasks[1]" in result.stderr and "text_classify" in result.stderr
    bad.write_text(text.replace("{tasks: [vqa], samples: 24}", "{tasks: [vqa2], samples: 24}"))
    result = run_cli("train", str(bad), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "data.clients[2].tasks" in result.stderr


def test_config_and_models_commands(smoke_config):
    shown = run_cli("config", str(smoke_config), "--set", "federation.rounds=9")
    assert shown.returncode == 0 and "rounds: 9" in shown.stdout
    listed = run_cli("models", "--plugin", str(FAILING_PLUGIN))
    assert "tap" in listed.stdout and "fedavg_failing" in listed.stdout


@pytest.mark.parametrize(
    "sets, words",
    [
        (["model.paths=[foo]"], ["model.paths", "unknown: foo", "shared_shared"]),
        (["tap.ablations=[bar]"], ["tap.ablations", "unknown: bar", "double_finetune"]),
        (["federation.algorithm=nope"], ["no algorithm named 'nope'", "registered: disentafl"]),
        (["federation.baselines=[local, nope]"], ["no algorithm named 'nope'"]),
        (["federation.baselines=[tap]"], ["name an algorithm twice"]),
        (["model.name=flava9"], ["no model named 'flava9'", "registered: tap"]),
    ],
)
def test_config_refuses_what_train_would_refuse(smoke_config, sets, words):
    """`tapdist config` checks the names train looks up, not only types and ranges."""
    result = run_cli("config", str(smoke_config), *(a for s in sets for a in ("--set", s)))
    assert result.returncode == 2 and not result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in result.stderr


def test_config_accepts_the_algorithms_of_its_plugins(smoke_config):
    plugin = f"run.plugins=[{FAILING_PLUGIN}]"
    sets = ["--set", plugin, "--set", "federation.baselines=[fedavg_failing]"]
    result = run_cli("config", str(smoke_config), *sets)
    assert result.returncode == 0, result.stderr
    assert "baselines:\n  - fedavg_failing" in result.stdout


@pytest.fixture(scope="module")
def smoke_file(tmp_path_factory):
    from tapdist.data.build import build_federation

    out = tmp_path_factory.mktemp("fed") / "smoke.h5"
    build_federation(SMOKE_HDF5.parent / "federations" / "smoke.yaml", out, progress=False)
    return out


def test_model_info_reads_tasks_and_clients_from_the_federation_file(smoke_file, capsys):
    assert main(["model-info", str(SMOKE_HDF5), "--set", f"data.path={smoke_file}"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[2].startswith("| server (union) |")
    assert [r.split("|")[1].strip() for r in rows[3:]] == [
        "client 0 (objects)",
        "client 1 (news)",
        "client 2 (vqa)",
        "client 3 (news+recon)",
        "client 4 (law_qa+objects)",
    ]


def test_model_info_without_the_federation_file_says_how_to_build_it(tmp_path):
    missing = tmp_path / "none.h5"
    result = run_cli("model-info", str(SMOKE_HDF5), "--set", f"data.path={missing}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert f"{missing}: federation file not found" in result.stderr
    assert "tapdist data build" in result.stderr


@pytest.mark.integration
def test_demo_command_builds_its_federation_and_runs_under_torchrun(tmp_path):
    """`tapdist demo` (README's main command) end to end on a one-round schedule: it builds
    the federation file, starts the ranks under torchrun and prints the comparison."""
    short = ["federation.rounds=1", "train.local_steps=1", "tap.finetune_steps=1"]
    cmd = [sys.executable, "-m", "tapdist", "demo", "--run-dir", str(tmp_path), "--processes", "2"]
    for item in short:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "federation.h5").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["tap", "fedavg", "fedavg_ft", "local"]
    assert "| image_cls · accuracy (%) ↑ |" in done.stdout
