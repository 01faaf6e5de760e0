"""Task and client specs from the data section: every mistake names the entry and the fix."""

import pytest
from conftest import SMOKE_CONFIG

from tapdist.config import ConfigError, load_config
from tapdist.data.spec import parse_clients, parse_tasks


def parse(tmp_path, old: str, new: str):
    text = SMOKE_CONFIG.read_text()
    assert old in text
    path = tmp_path / "c.yaml"
    path.write_text(text.replace(old, new))
    cfg = load_config(path)
    return parse_clients(cfg.data, parse_tasks(cfg.data))


def test_the_smoke_federation_parses():
    cfg = load_config(SMOKE_CONFIG)
    tasks = parse_tasks(cfg.data)
    clients = parse_clients(cfg.data, tasks)
    assert [t.name for t in tasks] == ["objects", "news", "recon", "vqa", "law_qa"]
    assert clients[4].tasks == ("law_qa", "objects") and clients[4].samples == 24


@pytest.mark.parametrize(
    "old, new, words",
    [
        ("domains: [news]", "domains: news", ["data.tasks[1].domains", "a list"]),
        ("name: news,", "name: news.v2,", ["data.tasks[1].name", "letters, digits"]),
        ("domains: [news]", "domains: [news/2]", ["data.tasks[1].domains", "letters, digits"]),
        ("kind: text_cls", "kind: text_classify", ["data.tasks[1]", "text_classify", "text_cls"]),
        ("classes: 4", "classes: 1", ["data.tasks[1]", "classes >= 2"]),
        (
            "modalities: [text], domains: [news]",
            "modalities: [audio], domains: [news]",
            ["data.tasks[1]", "audio"],
        ),
        (
            "{tasks: [news, recon], samples: 16}",
            "{tasks: [news, news], samples: 16}",
            ["data.clients[3].tasks", "twice"],
        ),
        ("{tasks: [vqa], samples: 24}", "{tasks: [vqa], samples: 0}", ["data.clients[2].samples"]),
        ("{tasks: [vqa], samples: 24}", "{tasks: [vqa], size: 24}", ["data.clients[2]", "size"]),
    ],
)
def test_mistakes_name_the_entry(tmp_path, old, new, words):
    with pytest.raises(ConfigError) as err:
        parse(tmp_path, old, new)
    for word in words:
        assert word in str(err.value)
