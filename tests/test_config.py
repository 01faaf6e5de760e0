from pathlib import Path

import pytest
import yaml

from tapdist import config
from tapdist.config import Config, ConfigError, describe, dump_config, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
YAML_FILES = sorted((ROOT / "configs").glob("*.yaml")) + sorted(
    (ROOT / "tests" / "configs").glob("*.yaml")
)


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.run_dir == Path("runs/tapdist")


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert load_config(path, []) == cfg
    # the resolved form reads back to the same config
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_reference_config_documents_every_key():
    assert (ROOT / "configs" / "reference.yaml").read_text() == describe(), (
        "configs/reference.yaml is stale: regenerate it with "
        "`tapdist config --describe > configs/reference.yaml`"
    )


def test_overrides_parse_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation: {rounds: 3}\n")
    cfg = load_config(
        path,
        [
            "federation.rounds=5",
            "run.name=123",
            "dist.timeout_s=7",
            "run.plugins=[a, b]",
            "dist.server_hosts_clients=false",
        ],
    )
    assert cfg.federation.rounds == 5
    assert cfg.run.name == "123"  # a str key keeps the text as written
    assert cfg.dist.timeout_s == 7.0 and isinstance(cfg.dist.timeout_s, float)
    assert cfg.run.plugins == ["a", "b"]
    assert cfg.dist.server_hosts_clients is False


def test_yaml_words_read_as_booleans_and_sections_left_empty(tmp_path):
    """YAML 1.1 reads an unquoted off as false: a key whose choices hold off takes it back. A
    section whose keys are all commented out is empty, for the file and for --set alike."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n  cuda_graphs: off\ndist:\n  # timeout_s: 30\n")
    cfg = load_config(path, ["dist.timeout_s=30"])
    assert (cfg.train.amp, cfg.train.cuda_graphs, cfg.dist.timeout_s) == ("off", "off", 30.0)
    path.write_text("train:\n  amp: yes\n")  # no choice of train.amp reads as true
    with pytest.raises(ConfigError, match="'train.amp': True"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["dist.timeout_s=.inf"], ["dist.timeout_s", "inf", "a number >= 1.0"]),
        (["train.lr=nan"], ["train.lr", "nan"]),
        (
            ["federation.roundz=3"],
            ["federation.roundz", "did you mean 'rounds'", "accepted keys", "clients_per_round"],
        ),
        (["federation.rounds=-1"], ["federation.rounds", "-1", "an integer >= 0"]),
        (["federation.rounds=2.5"], ["federation.rounds", "an integer"]),
        (["dist.backend=tcp"], ["dist.backend", "one of auto, nccl, gloo, mpi"]),
        (["dist.server_hosts_clients=yes please"], ["dist.server_hosts_clients", "true or false"]),
        (["feddration.rounds=3"], ["unknown section 'feddration'", "did you mean 'federation'"]),
        (["rounds=3"], ["section.key=value"]),
        (["federation.clients_per_round=11"], ["clients_per_round", "exceeds", "1..10"]),
        (["dist.backend=mpi", "dist.transport_dtype=bf16"], ["bf16", "mpi"]),
        (
            ["model.paths=[mod_task, foo]"],
            ["model.paths", "unknown: foo", "each one of shared_shared, shared_task, mod_task"],
        ),
        (["model.paths=[]"], ["model.paths", "(at least 1)"]),
        (
            ["tap.ablations=[bar]"],
            ["tap.ablations", "unknown: bar", "each one of no_distillation, double_finetune"],
        ),
    ],
)
def test_bad_values_name_key_and_accepted_values(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_fixed_value_sets_match_the_code_that_reads_them():
    """config.py cannot import torch-heavy modules: its copies of their value sets must agree."""
    from tapdist.fl.algorithms import ABLATIONS
    from tapdist.models.tap import PATHS

    assert config.PATHS == PATHS
    assert config.ABLATIONS == tuple(ABLATIONS)
    cfg = load_config(None, ["model.paths=[mod_task]", f"tap.ablations={list(ABLATIONS)}"])
    assert cfg.model.paths == ["mod_task"] and cfg.tap.ablations == list(ABLATIONS)


def key_help(section: str, key: str) -> str:
    """The line of `tapdist config --describe` that documents section.key."""
    lines = describe().split(f"\n{section}:")[1].split("\n\n")[0].splitlines()
    return next(line for line in lines if line.startswith(f"  {key}: "))


@pytest.mark.parametrize(
    "key, words",
    [
        ("model.pretrained", ["config file's folder", "package:NAME/PATH"]),
        ("model.text_encoder", ["config file's folder", "package:NAME/PATH"]),
        ("model.vision_encoder", ["config file's folder", "package:NAME/PATH"]),
        ("model.tokenizer", ["config file's folder", "package:NAME/PATH", "hdf5", "vocab_size"]),
        ("model.paths", ["each one of shared_shared, shared_task, mod_task, mod_shared"]),
        ("tap.ablations", ["each one of no_distillation, double_finetune"]),
        ("tap.finetune_steps", ["fedavg_ft", "local", "disentafl", "tap.ablations", "min_lr"]),
        ("train.min_lr", ["with warmup_rounds 0 every round uses lr"]),
        ("federation.clients", ["federation file's client count"]),
        ("data.source", ["vocab_size sizes the text-generation heads", "federation.clients"]),
        ("data.path", ["config file's folder", "also when given with --set"]),
    ],
)
def test_help_texts_say_what_the_code_does(key, words):
    line = key_help(*key.split("."))
    for word in words:
        assert word in line, (key, word)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory; give the YAML file in it"):
        load_config(tmp_path)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("run: {name: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9.*UTF-8"):
        load_config(latin)
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)
    for body in ("3", "false", "[]"):  # not a mapping, falsy or not
        bad.write_text(f"run: {body}\n")
        with pytest.raises(ConfigError, match="section 'run' must be a mapping"):
            load_config(bad)
    bad.write_text("tap: {margin: 0.1}\n")
    with pytest.raises(
        ConfigError,
        match="unknown key 'tap.margin'.*accepted keys in section 'tap': margin_image_cls",
    ):
        load_config(bad)
