"""Tasks and clients of a federation, read from the ``data`` config section.

```yaml
data:
  tasks:
    - {name: digits, kind: image_cls, modalities: [image], domains: [general_object], classes: 10}
    - {name: news, kind: text_cls, modalities: [text], domains: [news], classes: 4}
  clients:
    - {tasks: [digits], samples: 64}
    - {tasks: [news, digits], samples: 32}
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tapdist.config import ConfigError, DataConfig
from tapdist.models.tap import TaskSpec

_TASK_KEYS = {"name", "kind", "modalities", "domains", "classes"}
_CLIENT_KEYS = {"tasks", "samples", "test"}


@dataclass(frozen=True)
class ClientSpec:
    """A client: the tasks it trains, its training and held-out samples per task."""

    id: int
    tasks: tuple[str, ...]
    samples: int
    test: int


def parse_tasks(data: DataConfig) -> list[TaskSpec]:
    if not data.tasks:
        raise ConfigError(
            "data.tasks is empty: list the federation's tasks (name, kind, "
            "modalities, domains, classes)"
        )
    tasks, names = [], set()
    for i, raw in enumerate(data.tasks):
        where = f"data.tasks[{i}]"
        _keys(where, raw, _TASK_KEYS, required={"name", "kind", "modalities", "domains"})
        _name(f"{where}.name", raw["name"])
        for key in ("modalities", "domains"):
            if not isinstance(raw[key], list):
                raise ConfigError(f"{where}.{key} = {raw[key]!r}: a list, e.g. [{raw[key]}]")
        for domain in raw["domains"]:
            _name(f"{where}.domains", domain)
        try:
            task = TaskSpec(
                str(raw["name"]),
                raw["kind"],
                tuple(raw["modalities"]),
                tuple(raw["domains"]),
                int(raw.get("classes", 0)),
            )
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where}: {err}") from None
        if task.name in names:
            raise ConfigError(f"{where}: task name '{task.name}' is used twice")
        names.add(task.name)
        tasks.append(task)
    return tasks


def parse_clients(data: DataConfig, tasks: list[TaskSpec]) -> list[ClientSpec]:
    if not data.clients:
        raise ConfigError("data.clients is empty: list each client's tasks and samples")
    known = [t.name for t in tasks]
    clients = []
    for i, raw in enumerate(data.clients):
        where = f"data.clients[{i}]"
        _keys(where, raw, _CLIENT_KEYS, required={"tasks", "samples"})
        names = raw["tasks"]
        if not isinstance(names, list) or not names or any(n not in known for n in names):
            raise ConfigError(
                f"{where}.tasks = {names!r}: a non-empty list of task names "
                f"from data.tasks ({', '.join(known)})"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.tasks = {names!r} lists a task twice")
        samples = _count(f"{where}.samples", raw["samples"])
        test = _count(f"{where}.test", raw.get("test", max(8, samples // 4)))
        clients.append(ClientSpec(i, tuple(names), samples, test))
    return clients


def _count(where: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} = {value!r}: an integer >= 1")
    return value


_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _name(where: str, value: object) -> None:
    # names become parts of tensor names (heads.<task>., experts.<domain>.)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{where} = {value!r}: use letters, digits, '_' and '-' only")


def _keys(where: str, raw: object, accepted: set[str], required: set[str]) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(sorted(accepted))}")
    unknown = set(raw) - accepted
    missing = required - set(raw)
    if unknown or missing:
        raise ConfigError(
            f"{where}: unknown keys {sorted(unknown)}, missing keys "
            f"{sorted(missing)}; accepted: {', '.join(sorted(accepted))}"
        )
