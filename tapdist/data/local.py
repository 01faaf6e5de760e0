"""Sources reading the user's own files: ``hf_dataset`` and ``arrays``.

``hf_dataset`` reads a folder saved by ``datasets.save_to_disk`` (needs the ``datasets``
package) or a folder of ``.parquet`` (needs ``pyarrow``), ``.jsonl``/``.json`` or ``.csv``
files. A file belongs to split ``S`` when its name starts with ``S`` or it lies in a folder
``S``; a folder whose files match no split is one pool that the build splits by its seed.

``arrays`` reads an ``.npz`` file holding the federation-file arrays themselves (``image``,
``text``, ...), or ``train_*`` and ``test_*`` versions of them.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from tapdist.data import DataError
from tapdist.data.builders import BuildContext, Pool, TaskEntry
from tapdist.data.hdf5 import check_layout, check_values
from tapdist.models.heads import IMAGE_SIZE

FILE_TYPES = (".parquet", ".jsonl", ".json", ".csv")
HF_FIELDS = ("image_field", "text_field", "label_field", "answer_field", "domain_field")


def local_path(entry: TaskEntry, root: Path) -> Path:
    """The file or folder ``path`` of a local source, relative to the spec's data root."""
    return root / Path(entry.options["path"]).expanduser()


# --- tables -----------------------------------------------------------------------------------


class Table:
    """Rows of a local dataset: a list of records, or a ``datasets.Dataset``."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> list[str]:
        return list(self.rows[0]) if isinstance(self.rows, list) else self.rows.column_names

    def column(self, name: str, ids: np.ndarray | None = None) -> list:
        """Values of column ``name`` in rows ``ids`` (all rows when None)."""
        if not isinstance(self.rows, list):  # a datasets.Dataset
            rows = self.rows if ids is None else self.rows.select([int(i) for i in ids])
            return list(rows[name])
        picked = self.rows if ids is None else [self.rows[int(i)] for i in ids]
        try:
            return [row[name] for row in picked]
        except KeyError:
            raise DataError(
                f"column '{name}' is missing from some rows; columns: {sorted(picked[0])}"
            ) from None


def read_tables(folder: Path, splits: tuple[str, str]) -> tuple[Table, Table | None]:
    """(train table, test table or None) of a local dataset folder."""
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        return _read_saved(folder, splits)
    files = sorted(p for p in folder.rglob("*") if p.suffix in FILE_TYPES and p.is_file())
    if not files:
        raise DataError(
            f"{folder}: no dataset found: expected a `datasets.save_to_disk` folder or "
            f"{', '.join(FILE_TYPES)} files"
        )
    by_split = {s: [f for f in files if _in_split(f.relative_to(folder), s)] for s in splits}
    if not by_split[splits[0]]:
        return Table(_records(files)), None
    return Table(_records(by_split[splits[0]])), _maybe(by_split[splits[1]])


def _maybe(files: list[Path]) -> Table | None:
    return Table(_records(files)) if files else None


def _in_split(relative: Path, split: str) -> bool:
    return split in relative.parts[:-1] or relative.name.startswith(split)


def _read_saved(folder: Path, splits: tuple[str, str]) -> tuple[Table, Table | None]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{folder} was saved by `datasets.save_to_disk`: reading it needs the datasets "
            "package (pip install datasets), or export it as parquet/jsonl/csv files"
        ) from None
    saved = datasets.load_from_disk(str(folder))
    if isinstance(saved, datasets.Dataset):
        return Table(saved), None
    if splits[0] not in saved:
        raise DataError(f"{folder}: split '{splits[0]}' not among {list(saved)}; set split_train")
    return Table(saved[splits[0]]), Table(saved[splits[1]]) if splits[1] in saved else None


def _records(files: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for file in files:
        if file.suffix == ".parquet":
            rows += _parquet(file)
        elif file.suffix == ".csv":
            with open(file, newline="", encoding="utf-8") as handle:
                rows += list(csv.DictReader(handle))
        elif file.suffix == ".json":
            rows += json.loads(file.read_text(encoding="utf-8"))
        else:
            lines = file.read_text(encoding="utf-8").splitlines()
            rows += [json.loads(line) for line in lines if line.strip()]
    return rows


def _parquet(file: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{file}: reading parquet files needs pyarrow (pip install pyarrow), or export the "
            "dataset as jsonl/csv files"
        ) from None
    return pq.read_table(file).to_pylist()


# --- hf_dataset -------------------------------------------------------------------------------


def hf_dataset_pool(entry: TaskEntry, ctx: BuildContext) -> Pool:
    """Samples of a local Hugging Face dataset (see the module docstring)."""
    folder = local_path(entry, ctx.data_root)
    opts = entry.options
    splits = (opts.get("split_train", "train"), opts.get("split_test", "test"))
    train_table, test_table = read_tables(folder, splits)
    tables = [train_table] + ([test_table] if test_table is not None else [])
    for table in tables:
        _check_columns(entry, table, folder)
    offset = len(train_table)
    if test_table is None:
        train, test = ctx.split(f"hf:{folder}", offset)
    else:
        train, test = np.arange(offset), offset + np.arange(len(test_table))
    labels = _Labels(entry, tables, folder) if entry.kind.endswith("_cls") else None
    reader = _RowReader(entry, ctx, folder, labels)

    def make(ids: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        in_test = ids >= offset
        for rows, table, base in ((~in_test, train_table, 0), (in_test, test_table, offset)):
            if rows.any():
                for k, v in reader(table, ids[rows] - base).items():
                    out.setdefault(k, np.empty((len(ids), *v.shape[1:]), v.dtype))[rows] = v
        return out

    if labels is None:
        return Pool(train, test, make)
    targets = np.concatenate([labels.encode(t.column(opts["label_field"])) for t in tables])
    return Pool(train, test, make, labels.classes, targets, labels.classes, labels.names)


def _check_columns(entry: TaskEntry, table: Table, folder: Path) -> None:
    if not len(table):
        raise DataError(f"{folder}: a split of the dataset has no rows")
    columns = table.columns()
    wanted = {k: v for k, v in entry.options.items() if k in HF_FIELDS}
    missing = {k: v for k, v in wanted.items() if v not in columns}
    if missing:
        raise DataError(
            f"{folder} (task '{entry.name}'): columns {sorted(missing.values())} named by "
            f"{sorted(missing)} are not in the dataset; its columns: {sorted(columns)}"
        )


class _Labels:
    """Class indices of a label column: integers as they are, strings in sorted order."""

    def __init__(self, entry: TaskEntry, tables: list[Table], folder: Path):
        column = entry.options["label_field"]
        values = [v for t in tables for v in t.column(column)]
        _no_nulls(values, column, folder)
        self.numeric = all(_is_int(v) for v in values)
        if self.numeric:
            self.names = None
            found = max(int(v) for v in values) + 1
        else:
            self.names = sorted({str(v) for v in values})
            found = len(self.names)
        self.classes = entry.classes or found
        if found > self.classes:
            raise DataError(
                f"{folder}: {entry.options['label_field']} holds {found} classes but task "
                f"'{entry.name}' sets classes: {entry.classes}; raise classes"
            )

    def encode(self, values: list) -> np.ndarray:
        if self.numeric:
            return np.array([int(v) for v in values], dtype=np.int32)
        index = {n: i for i, n in enumerate(self.names)}
        return np.array([index[str(v)] for v in values], dtype=np.int32)


class _RowReader:
    """Turns rows of a table into federation-file arrays for one task."""

    def __init__(self, entry: TaskEntry, ctx: BuildContext, folder: Path, labels):
        self.entry, self.ctx, self.folder, self.labels = entry, ctx, folder, labels

    def __call__(self, table: Table, ids: np.ndarray) -> dict[str, np.ndarray]:
        opts, dims, fields = self.entry.options, self.ctx.dims, self.entry.fields()
        out = {}
        if "image" in fields:
            images = table.column(opts["image_field"], ids)
            out["image"] = np.stack([_image(v, self.folder) for v in images]).reshape(
                len(ids), 3, IMAGE_SIZE, IMAGE_SIZE
            )
        if "text" in fields:
            texts = [_words(v) for v in self._values(opts["text_field"], table, ids)]
            out["text"], out["text_mask"] = self.ctx.tokenizer().texts(texts, dims.text_len)
        if "label" in fields:
            out["label"] = self.labels.encode(table.column(opts["label_field"], ids))
        if "answer" in fields:
            answers = [_words(v) for v in self._values(opts["answer_field"], table, ids)]
            out["answer"] = self.ctx.tokenizer().answers(answers, dims.answer_len)
        out["domain"] = self._domains(table, ids)
        return out

    def _values(self, column: str, table: Table, ids: np.ndarray) -> list:
        values = table.column(column, ids)
        _no_nulls(values, column, self.folder)
        return values

    def _domains(self, table: Table, ids: np.ndarray) -> np.ndarray:
        name = self.entry.options.get("domain_field")
        if name is None:
            return np.zeros(len(ids), np.int32)
        domains = self.entry.domains
        values = [str(v) for v in table.column(name, ids)]
        bad = sorted({v for v in values if v not in domains and not _index(v, len(domains))})
        if bad:
            raise DataError(
                f"{self.folder}: column {name} holds {bad[:5]}, which are neither domains of "
                f"task '{self.entry.name}' ({list(domains)}) nor indices into them"
            )
        return np.array([domains.index(v) if v in domains else int(v) for v in values], np.int32)


def _image(value, folder: Path) -> np.ndarray:
    """One image value (PIL image, {'bytes'|'path'}, file path or pixel array) -> (3, 64, 64)."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        value = Image.open(folder / value)
    elif not isinstance(value, Image.Image):
        value = Image.fromarray(_pixels(np.asarray(value), folder))
    rgb = value.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _pixels(array: np.ndarray, folder: Path) -> np.ndarray:
    """A pixel array as PIL reads it: uint8, (H, W) or (H, W, C). Accepted: (H, W), (H, W, C)
    and (C, H, W) with C of 1, 3 or 4; integers in 0..255, or floats in 0..1 (scaled by 255)
    or 0..255."""
    channels = (1, 3, 4)
    if array.ndim == 3 and array.shape[0] in channels and array.shape[-1] not in channels:
        array = array.transpose(1, 2, 0)  # channels first
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in channels):
        raise DataError(
            f"{folder}: an image array of shape {array.shape}; give (H, W), (H, W, C) or "
            "(C, H, W) with C of 1, 3 or 4"
        )
    if np.issubdtype(array.dtype, np.floating):
        array = array * 255.0 if array.size and float(array.max()) <= 1.0 else array
        array = np.rint(array)
    if array.size and (float(array.min()) < 0 or float(array.max()) > 255):
        raise DataError(
            f"{folder}: image pixels span {array.min()}..{array.max()}; give 0..255, or floats "
            "in 0..1"
        )
    return array.astype(np.uint8)


def _no_nulls(values: list, column: str, folder: Path) -> None:
    missing = sum(value is None for value in values)
    if missing:
        raise DataError(
            f"{folder}: column {column} holds {missing} empty value(s) (null); drop or fill "
            "those rows"
        )


def _words(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.isdigit())


def _index(value: str, count: int) -> bool:
    return value.isdigit() and int(value) < count


# --- arrays -----------------------------------------------------------------------------------


def arrays_pool(entry: TaskEntry, ctx: BuildContext) -> Pool:
    """Samples of an ``.npz`` of federation-file arrays, validated like a federation file."""
    path = local_path(entry, ctx.data_root)
    try:
        with np.load(path) as npz:
            stored = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    task = entry.spec(_array_classes(entry, stored))
    fields = entry.fields()
    parts = {s: _pick(stored, f"{s}_", fields) for s in ("train", "test")}
    if not (parts["train"] and parts["test"]):
        parts = {"all": _pick(stored, "", fields)}
    fix = f"fix the arrays in {path} (names: {', '.join(fields)}, or train_* and test_*)"
    counts = []
    for split, arrays in parts.items():
        where = f"{path} ({split} arrays of task '{entry.name}')"
        counts.append(check_layout(where, task, arrays, ctx.dims, fix, strict=False))
        check_values(where, task, arrays, ctx.dims, fix)
    arrays = {f: np.concatenate([p[f] for p in parts.values()]) for f in fields}
    if "all" in parts:
        train, test = ctx.split(f"arrays:{path}", counts[0])
    else:
        train, test = np.arange(counts[0]), np.arange(counts[0], sum(counts))
    targets = arrays.get("label")
    count = task.classes if targets is not None else 0
    return Pool(
        train,
        test,
        lambda ids: {k: v[ids] for k, v in arrays.items()},
        *(task.classes, targets, count),
    )


def _pick(stored: dict, prefix: str, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays named ``prefix + field``; a missing domain array means domain 0 throughout."""
    found = {f: stored[prefix + f] for f in fields if prefix + f in stored}
    if found and "domain" not in found:
        found["domain"] = np.zeros(len(next(iter(found.values()))), np.int32)
    return found


def _array_classes(entry: TaskEntry, stored: dict) -> int:
    labels = [v for k, v in stored.items() if k.endswith("label") and v.size]
    if entry.classes or not entry.kind.endswith("_cls") or not labels:
        return entry.classes
    return max(int(v.max()) for v in labels) + 1
