"""The HDF5 federation file: every client's train and test samples per task, in one file.

```
/                              attrs: format, version, image_size, text_len, answer_len,
                                      vocab_size, tokenizer, seed, description
/tasks/<task>                  attrs: kind, modalities, domains, classes, label_names (optional)
/clients/<id>                  attrs: tasks (the client's task names, in order)
/clients/<id>/<task>/<split>   datasets image, text, text_mask, label, answer, domain
```

``id`` counts clients from 0 and ``split`` is ``train`` or ``test``. A split holds only the
datasets its task needs (:func:`task_fields`); docs/data.md describes each one. Files are written
by ``tapdist data build`` (:mod:`tapdist.data.build`) and read by the training run.

Every dataset carries a Fletcher-32 checksum per chunk and the file uses the HDF5 1.10 formats,
whose metadata carry checksums too, so a damaged file fails to read with :class:`DataError`
instead of yielding wrong samples (random image bytes are otherwise indistinguishable from
damaged ones).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from tapdist.data import DataError
from tapdist.models.heads import IMAGE_SIZE
from tapdist.models.tap import TaskSpec

FORMAT = "tapdist-federation"
VERSION = 1
SPLITS = ("train", "test")
IGNORE = -100  # answer positions the loss skips
STORED = {  # dataset -> dtype in the file
    "image": np.dtype(np.uint8),
    "text": np.dtype(np.int32),
    "text_mask": np.dtype(np.uint8),
    "label": np.dtype(np.int32),
    "answer": np.dtype(np.int32),
    "domain": np.dtype(np.int32),
}
_TASK_ATTRS = ("kind", "modalities", "domains", "classes")
_ROOT_ATTRS = ("text_len", "answer_len", "vocab_size")
_REBUILD = "rebuild it with `tapdist data build SPEC --out FILE`"
_COMPRESSED = {"image", "text", "text_mask", "answer"}
# HDF5 1.10 formats (readable by HDF5 >= 1.10): checksummed object headers and B-trees
_LIBVER = ("v110", "v110")


@dataclass(frozen=True)
class Dims:
    """Per-sample sizes shared by every task of a federation."""

    text_len: int
    answer_len: int
    vocab_size: int


@dataclass(frozen=True)
class ClientMeta:
    """A client of a federation file: its tasks and its samples per task in each split."""

    id: int
    tasks: tuple[str, ...]
    train: dict[str, int]
    test: dict[str, int]


@dataclass(frozen=True)
class FederationMeta:
    """Everything about a federation file except its samples."""

    path: Path
    tasks: list[TaskSpec]
    clients: list[ClientMeta]
    text_len: int
    answer_len: int
    vocab_size: int
    tokenizer: str
    description: str
    label_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def dims(self) -> Dims:
        return Dims(self.text_len, self.answer_len, self.vocab_size)


def task_fields(task: TaskSpec) -> tuple[str, ...]:
    """The datasets a split of ``task`` holds: its inputs, its target and the domain."""
    fields = []
    if "image" in task.modalities or task.kind == "image_gen":  # image_gen rebuilds its image
        fields.append("image")
    if "text" in task.modalities:
        fields += ["text", "text_mask"]
    if task.kind.endswith("_cls"):
        fields.append("label")
    if task.kind == "text_gen":
        fields.append("answer")
    return (*fields, "domain")


def expected_shape(name: str, dims: Dims) -> tuple[int, ...]:
    """Per-sample shape of dataset ``name``."""
    return {
        "image": (3, IMAGE_SIZE, IMAGE_SIZE),
        "text": (dims.text_len,),
        "text_mask": (dims.text_len,),
        "answer": (dims.answer_len,),
    }.get(name, ())


# --- validation shared by files, builders and user arrays -------------------------------------


def check_layout(
    where: str, task: TaskSpec, arrays: Mapping, dims: Dims, fix: str, strict: bool = True
) -> int:
    """Check that ``arrays`` holds each dataset ``task`` needs with the right dtype and shape;
    return the sample count. ``strict`` demands the stored dtypes, else any integer dtype does
    for the integer fields. Reads no values."""
    count = None
    for name in task_fields(task):
        if name not in arrays:
            raise DataError(
                f"{where}: dataset '{name}' is missing (task '{task.name}' of kind {task.kind} "
                f"with modalities {list(task.modalities)} needs {', '.join(task_fields(task))}); "
                f"{fix}"
            )
        array = arrays[name]
        if not hasattr(array, "dtype"):
            raise DataError(f"{where}/{name}: not an array (a group?); {fix}")
        _check_dtype(f"{where}/{name}", name, array.dtype, strict, dims, fix)
        shape = tuple(array.shape)
        if shape[1:] != expected_shape(name, dims) or len(shape) == 0:
            raise DataError(
                f"{where}/{name}: shape {shape}, expected {_describe(name, dims)}; {fix}"
            )
        if count is not None and shape[0] != count:
            raise DataError(
                f"{where}: datasets hold different sample counts ({name} has {shape[0]}, the "
                f"fields before it {count}); every field needs one row per sample; {fix}"
            )
        count = shape[0]
    if not count:
        raise DataError(f"{where}: the split holds 0 samples; give every split samples; {fix}")
    return count


def check_values(where: str, task: TaskSpec, arrays: Mapping, dims: Dims, fix: str) -> None:
    """Check the value ranges of ``arrays`` (min and max only), and that every answer holds a
    token (an empty one would score as a perfect prediction and train on nothing)."""
    limits = {
        "label": (0, task.classes - 1, f"a class index of the task's {task.classes} classes"),
        "domain": (0, len(task.domains) - 1, f"an index into domains {list(task.domains)}"),
        "text": (0, dims.vocab_size - 1, f"a token id below vocab_size {dims.vocab_size}"),
        "text_mask": (0, 1, "0 (padding) or 1 (a real token)"),
        "answer": (IGNORE, dims.vocab_size - 1, f"a token id or {IGNORE} (padding)"),
    }
    needed = task_fields(task)
    for name, (low, high, meaning) in limits.items():
        if name not in arrays or name not in needed:
            continue
        values = np.asarray(arrays[name][()])
        lo, hi = int(values.min()), int(values.max())
        bad_answer = name == "answer" and np.any((values < 0) & (values != IGNORE))
        if lo < low or hi > high or bad_answer:
            raise DataError(
                f"{where}/{name}: values span {lo}..{hi}; each must be {meaning}; {fix}"
            )
        if name == "answer":
            empty = np.flatnonzero((values != IGNORE).sum(axis=-1) == 0)
            if len(empty):
                raise DataError(
                    f"{where}/answer: {len(empty)} answer(s) hold no token (the first: sample "
                    f"{empty[0]}); every text-generation sample needs a non-empty answer; {fix}"
                )


def _check_dtype(where: str, name: str, dtype, strict: bool, dims: Dims, fix: str) -> None:
    want = STORED[name]
    ok = dtype == want if strict or name == "image" else np.issubdtype(dtype, np.integer)
    if not ok:
        raise DataError(f"{where}: dtype {dtype}, expected {_describe(name, dims)}; {fix}")


def _describe(name: str, dims: Dims) -> str:
    shape = ", ".join(["N", *map(str, expected_shape(name, dims))])
    return f"{STORED[name]} ({shape})" if "," in shape else f"{STORED[name]} (N,)"


# --- writing ----------------------------------------------------------------------------------


def write_federation(
    path: Path | str,
    meta_attrs: dict,
    tasks: list[TaskSpec],
    clients: list[dict[str, dict[str, dict[str, np.ndarray]]]],
    label_names: dict | None = None,
) -> None:
    """Write a federation file atomically: a temporary file beside ``path``, then a rename.

    ``meta_attrs`` holds text_len, answer_len and vocab_size, and optionally tokenizer, seed and
    description; ``clients[i][task][split][field]`` is an array of the split's samples.
    """
    path = Path(path)
    dims = Dims(*(int(meta_attrs[k]) for k in _ROOT_ATTRS))
    by_name = {t.name: t for t in tasks}
    for i, client in enumerate(clients):
        _check_client(f"client {i}", client, by_name, dims)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", libver=_LIBVER) as f:
            _write_root(f, meta_attrs, dims)
            _write_tasks(f, tasks, label_names or {})
            group = f.create_group("clients")
            for i, client in enumerate(clients):
                _write_client(group.create_group(str(i)), client, by_name)
            f.flush()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_client(where: str, client: dict, tasks: dict[str, TaskSpec], dims: Dims) -> None:
    fix = "fix the arrays given to write_federation"
    if not client:
        raise DataError(f"{where} has no tasks; every client needs at least one")
    for name, splits in client.items():
        if name not in tasks:
            raise DataError(f"{where}: task '{name}' is not among the tasks {list(tasks)}")
        for split in SPLITS:
            if split not in splits:
                raise DataError(f"{where}/{name}: split '{split}' is missing; {fix}")
            check_layout(f"{where}/{name}/{split}", tasks[name], splits[split], dims, fix, False)
            check_values(f"{where}/{name}/{split}", tasks[name], splits[split], dims, fix)


def _write_root(f: h5py.File, meta: dict, dims: Dims) -> None:
    f.attrs.update(
        format=FORMAT,
        version=VERSION,
        image_size=IMAGE_SIZE,
        text_len=dims.text_len,
        answer_len=dims.answer_len,
        vocab_size=dims.vocab_size,
        tokenizer=str(meta.get("tokenizer", "")),
        seed=int(meta.get("seed", 0)),
        description=str(meta.get("description", "")),
    )


def _write_tasks(f: h5py.File, tasks: list[TaskSpec], label_names: dict) -> None:
    group = f.create_group("tasks", track_order=True)
    for task in tasks:
        g = group.create_group(task.name)
        g.attrs.update(kind=task.kind, classes=task.classes)
        g.attrs["modalities"] = _strings_attr(task.modalities)
        g.attrs["domains"] = _strings_attr(task.domains)
        if label_names.get(task.name):
            g.attrs["label_names"] = _strings_attr(label_names[task.name])


def _write_client(group: h5py.Group, client: dict, tasks: dict[str, TaskSpec]) -> None:
    group.attrs["tasks"] = _strings_attr(client)
    for task, splits in client.items():
        for split in SPLITS:
            g = group.create_group(f"{task}/{split}")
            for name in task_fields(tasks[task]):
                _write_dataset(g, name, splits[split][name])


def _write_dataset(group: h5py.Group, name: str, array: np.ndarray) -> None:
    data = np.ascontiguousarray(array, dtype=STORED[name])
    if name not in _COMPRESSED:
        group.create_dataset(name, data=data, fletcher32=True)
        return
    # lzf: fast to write and read, always available in h5py; 64-sample chunks match batches
    chunks = (min(len(data), 64), *data.shape[1:])
    group.create_dataset(name, data=data, compression="lzf", chunks=chunks, fletcher32=True)


def _strings_attr(values) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=h5py.string_dtype())


# --- reading ----------------------------------------------------------------------------------


def read_meta(path: Path | str) -> FederationMeta:
    """Open and validate a federation file: attributes, tasks, clients, every dataset's dtype and
    shape, and the range of each label and domain. Reads no images, texts or answers."""
    path = Path(path)
    with _open(path) as f:
        dims = _read_root(path, f)
        tasks, names = _read_tasks(path, f)
        clients = _read_clients(path, f, {t.name: t for t in tasks}, dims)
        return FederationMeta(
            path=path,
            tasks=tasks,
            clients=clients,
            text_len=dims.text_len,
            answer_len=dims.answer_len,
            vocab_size=dims.vocab_size,
            tokenizer=str(f.attrs.get("tokenizer", "")),
            description=str(f.attrs.get("description", "")),
            label_names=names,
        )


def read_client(
    path: Path | str, client: int, split: str, domains: list[str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """One client's samples of ``split``: task -> field -> tensor. Images stay uint8; every other
    field is int64. With ``domains`` (the model's domain list) each ``domain`` index is mapped
    from the task's own domains to an index into ``domains``."""
    path = Path(path)
    if split not in SPLITS:
        raise DataError(f"split '{split}' is unknown; accepted: {', '.join(SPLITS)}")
    with _open(path) as f:
        dims = _read_root(path, f)
        tasks, _ = _read_tasks(path, f)
        by_name = {t.name: t for t in tasks}
        names = _client_tasks(path, f, client, by_name)
        data = {}
        for name in names:
            where = f"{path}: /clients/{client}/{name}/{split}"
            group = _group(f, f"clients/{client}/{name}/{split}", where)
            check_layout(where, by_name[name], group, dims, _REBUILD)
            arrays = {k: group[k][()] for k in task_fields(by_name[name])}
            check_values(where, by_name[name], arrays, dims, _REBUILD)
            data[name] = _tensors(arrays, by_name[name], domains, where)
        return data


def _tensors(arrays: dict, task: TaskSpec, domains: list[str] | None, where: str) -> dict:
    out = {
        k: torch.from_numpy(v) if k == "image" else torch.from_numpy(v.astype(np.int64))
        for k, v in arrays.items()
    }
    if domains is not None:
        missing = [d for d in task.domains if d not in domains]
        if missing:
            raise DataError(
                f"{where}: the task's domains {missing} are not among the model's domains "
                f"{domains}; build the model from this file's tasks"
            )
        remap = torch.tensor([domains.index(d) for d in task.domains], dtype=torch.long)
        out["domain"] = remap[out["domain"]]
    return out


@contextmanager
def _open(path: Path) -> Iterator[h5py.File]:
    if not path.is_file():
        raise DataError(
            f"{path}: federation file not found; build one with "
            "`tapdist data build SPEC --out FILE` (see docs/data.md)"
        )
    try:
        with h5py.File(path, "r") as f:
            yield f
    except (OSError, KeyError) as err:
        if isinstance(err, KeyError) and not _h5_message(err).startswith("Unable to"):
            raise  # not h5py failing to open an object: a bug, keep its traceback
        raise DataError(
            f"{path}: not a readable HDF5 file (truncated or corrupt: {_h5_message(err)}); "
            f"{_REBUILD}"
        ) from None


def _h5_message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _read_root(path: Path, f: h5py.File) -> Dims:
    fmt = f.attrs.get("format")
    if fmt != FORMAT:
        raise DataError(
            f"{path}: attribute / format is {fmt!r}, expected '{FORMAT}': this HDF5 file is not "
            f"a tapdist federation; {_REBUILD}"
        )
    version = int(f.attrs.get("version", -1))
    if version != VERSION:
        raise DataError(f"{path}: format version {version}; this tapdist reads {VERSION}")
    missing = [k for k in _ROOT_ATTRS if k not in f.attrs]
    if missing:
        raise DataError(f"{path}: / lacks the attributes {missing}; {_REBUILD}")
    return Dims(*(int(f.attrs[k]) for k in _ROOT_ATTRS))


def _read_tasks(path: Path, f: h5py.File) -> tuple[list[TaskSpec], dict[str, list[str]]]:
    group = _group(f, "tasks", f"{path}: /tasks")
    tasks, label_names = [], {}
    for name, g in group.items():
        where = f"{path}: /tasks/{name}"
        if not isinstance(g, h5py.Group):  # None: a damaged object h5py cannot open
            raise DataError(f"{where}: cannot be read (the file is corrupt); {_REBUILD}")
        missing = [a for a in _TASK_ATTRS if a not in g.attrs]
        if missing:
            raise DataError(
                f"{where} lacks the attributes {missing} (a task needs "
                f"{', '.join(_TASK_ATTRS)}); {_REBUILD}"
            )
        try:
            task = TaskSpec(
                name,
                str(g.attrs["kind"]),
                _strings(g.attrs["modalities"]),
                _strings(g.attrs["domains"]),
                int(g.attrs["classes"]),
            )
        except ValueError as err:
            raise DataError(f"{where}: {err}; {_REBUILD}") from None
        tasks.append(task)
        if "label_names" in g.attrs:
            label_names[name] = list(_strings(g.attrs["label_names"]))
    if not tasks:
        raise DataError(f"{path}: /tasks is empty; {_REBUILD}")
    return tasks, label_names


def _read_clients(
    path: Path, f: h5py.File, tasks: dict[str, TaskSpec], dims: Dims
) -> list[ClientMeta]:
    group = _group(f, "clients", f"{path}: /clients")
    ids = sorted(int(k) for k in group if k.isdigit())
    if not ids or ids != list(range(len(group))):
        raise DataError(
            f"{path}: /clients holds {sorted(group)}; expected groups 0..N-1; {_REBUILD}"
        )
    clients = []
    for i in ids:
        names = _client_tasks(path, f, i, tasks)
        counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
        for name in names:
            for split in SPLITS:
                where = f"{path}: /clients/{i}/{name}/{split}"
                g = _group(f, f"clients/{i}/{name}/{split}", where)
                counts[split][name] = check_layout(where, tasks[name], g, dims, _REBUILD)
                small = {k: g[k] for k in ("label", "domain") if k in g}
                check_values(where, tasks[name], small, dims, _REBUILD)
        clients.append(ClientMeta(i, names, counts["train"], counts["test"]))
    return clients


def _client_tasks(path: Path, f: h5py.File, client: int, tasks: dict) -> tuple[str, ...]:
    where = f"{path}: /clients/{client}"
    group = _group(f, f"clients/{client}", where)
    if "tasks" not in group.attrs:
        raise DataError(f"{where} lacks the attribute 'tasks'; {_REBUILD}")
    names = _strings(group.attrs["tasks"])
    unknown = [n for n in names if n not in tasks]
    if unknown or not names:
        raise DataError(
            f"{where}: lists tasks {list(names)}; {unknown or 'none'} are not under /tasks "
            f"({', '.join(tasks)}); {_REBUILD}"
        )
    return names


def _group(f: h5py.File, name: str, where: str) -> h5py.Group:
    if not isinstance(f.get(name), h5py.Group):
        raise DataError(f"{where}: group is missing; {_REBUILD}")
    return f[name]


def _strings(value) -> tuple[str, ...]:
    values = [value] if isinstance(value, (str, bytes)) else list(np.atleast_1d(value))
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)
