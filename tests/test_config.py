from pathlib import Path

import pytest
import yaml

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
    ],
)
def test_bad_values_name_key_and_accepted_values(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for word in words:
        assert word in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
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
