"""Trainable states on disk: HDF5, one dataset per tensor name, written atomically.

A file is written to a temporary name in the target folder, flushed and fsynced, then renamed
over the target, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np
import torch

# numpy has no bfloat16: such tensors are stored as their uint16 bit patterns, tagged.
_DTYPE_ATTR = "torch_dtype"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_state(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], attrs: Mapping[str, object] = ()
) -> None:
    """Write ``state`` to HDF5 at ``path`` atomically; ``attrs`` go on the root group."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for key, value in dict(attrs).items():
            h5.attrs[key] = value
        _write_state(h5, state)


def save_states(
    path: str | os.PathLike,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    attrs: Mapping[str, object] = (),
) -> None:
    """Write several states to one HDF5 file atomically, one group per key of ``states``."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for key, value in dict(attrs).items():
            h5.attrs[key] = value
        for group, state in states.items():
            _write_state(h5.create_group(group), state)


def load_states(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read the states of a file written by :func:`save_states`: group -> state."""
    with h5py.File(path, "r") as h5:
        return {name: _read_state(group) for name, group in h5.items()}


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state written by :func:`save_state`, bit for bit."""
    with h5py.File(path, "r") as h5:
        return _read_state(h5)


def _write_state(group: h5py.Group, state: Mapping[str, torch.Tensor]) -> None:
    for name in state:
        if "/" in name:
            raise ValueError(f"tensor name '{name}' contains '/', which HDF5 reads as a group")
    for name, tensor in state.items():
        data = tensor.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            ds = group.create_dataset(name, data=data.view(torch.uint16).numpy())
        else:
            ds = group.create_dataset(name, data=data.numpy())
        ds.attrs[_DTYPE_ATTR] = str(data.dtype).removeprefix("torch.")


def _read_state(group: h5py.Group) -> dict[str, torch.Tensor]:
    state = {}
    for name, ds in group.items():
        tensor = torch.from_numpy(np.asarray(ds[()]))
        if ds.attrs.get(_DTYPE_ATTR) == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        state[name] = tensor
    return state


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
