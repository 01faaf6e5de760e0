import h5py
import pytest
import torch

from tapdist.checkpoint import atomic_path, load_state, save_state


def test_roundtrip_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {
        "enc.image.lora_A": torch.randn(4, 8, generator=gen),
        "head.bias": torch.randn(3, generator=gen).to(torch.bfloat16),
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "steps": torch.arange(5, dtype=torch.int32),
    }
    path = tmp_path / "final" / "global.h5"
    save_state(path, state, {"round": 3})
    back = load_state(path)
    assert list(back) == sorted(state)  # HDF5 lists names in order
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    with h5py.File(path) as h5:  # one dataset per parameter name
        assert set(h5) == set(state) and h5.attrs["round"] == 3


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "global.h5"
    save_state(path, {"a": torch.ones(2)})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert torch.equal(load_state(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["global.h5"]


def test_slash_in_names_is_refused(tmp_path):
    with pytest.raises(ValueError, match="contains '/'"):
        save_state(tmp_path / "x.h5", {"a/b": torch.ones(1)})
