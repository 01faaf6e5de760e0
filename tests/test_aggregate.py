import random

import pytest
import torch

from tapdist.dist import SingleProcessContext
from tapdist.fl.aggregate import (
    FlatLayout,
    RoundBuffer,
    Workspace,
    accumulate,
    all_reduce_round,
    finalize,
    pack,
    sends_deltas,
    unpack,
)


def random_union(rng: random.Random) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(rng.randint(1, 12)):
        rank = rng.randint(0, 3)
        shapes[f"block{i}.param{rng.randint(0, 9)}"] = tuple(rng.randint(1, 7) for _ in range(rank))
    return shapes


def naive_average(old, uploads):
    """Per parameter: weighted mean over the clients that hold it; else unchanged."""
    new = {}
    for name, value in old.items():
        holders = [(w, s[name].double()) for w, s in uploads if name in s]
        if holders:
            total = sum(w for w, _ in holders)
            new[name] = (sum(w * v for w, v in holders) / total).float()
        else:
            new[name] = value
    return new


@pytest.mark.parametrize("trial", range(25))
def test_matches_naive_average(trial):
    rng = random.Random(trial)
    gen = torch.Generator().manual_seed(trial)
    shapes = random_union(rng)
    layout = FlatLayout.from_shapes(shapes)
    old = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    uploads = []
    for _ in range(rng.randint(1, 6)):
        held = rng.sample(list(shapes), rng.randint(0, len(shapes)))
        state = {n: torch.randn(shapes[n], generator=gen) * 10 for n in held}
        uploads.append((rng.randint(1, 5000), state))
    buf = RoundBuffer.zeros(layout, n_clients=len(uploads), n_stats=2)
    for weight, state in uploads:
        accumulate(buf, state, weight)
    new = finalize(buf, old)
    expected = naive_average(old, uploads)
    assert list(new) == list(shapes)
    for name in shapes:
        assert new[name].shape == old[name].shape
        assert (new[name] - expected[name]).abs().max().item() <= 1e-6 * max(
            1.0, expected[name].abs().max().item()
        )
        if not any(name in s for _, s in uploads):
            assert new[name] is old[name]


def test_bf16_transport_is_close_to_fp32():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (64, 32), "b": (7,), "c": (3, 3)}
    layout = FlatLayout.from_shapes(shapes)
    old = {n: torch.zeros(s) for n, s in shapes.items()}
    results = {}
    for dtype in ("fp32", "bf16"):
        gen.manual_seed(0)
        buf = RoundBuffer.zeros(layout, 3, 1)
        for weight in (1000, 3, 77):
            accumulate(buf, {n: torch.randn(s, generator=gen) for n, s in shapes.items()}, weight)
        buf.stats[1, 0] = 123.25
        sent = all_reduce_round(_OneOfTwo(), buf, dtype, "test")
        results[dtype] = (finalize(buf, old), sent, buf.stats.clone(), buf.counts.clone())
    (exact, sent32, stats32, counts32), (approx, sent16, stats16, counts16) = (
        results["fp32"],
        results["bf16"],
    )
    assert sent16 < 0.6 * sent32
    assert torch.equal(stats16, stats32) and torch.equal(counts16, counts32)
    for name in shapes:
        torch.testing.assert_close(approx[name], exact[name], rtol=1e-2, atol=1e-2)


class _OneOfTwo(SingleProcessContext):
    """Rank 0 of two whose partner contributes zeros: the sum is the local buffer."""

    def __init__(self):
        super().__init__()
        self.world_size = 2


def test_nothing_travels_in_a_single_process():
    layout = FlatLayout.from_shapes({"a": (3,)})
    buf = RoundBuffer.zeros(layout, 1, 1)
    accumulate(buf, {"a": torch.tensor([1.0, 2.0, 3.0])}, 3)
    assert all_reduce_round(SingleProcessContext(), buf, "bf16", "test") == 0
    assert finalize(buf, {"a": torch.zeros(3)})["a"].tolist() == [1.0, 2.0, 3.0]


def test_layout_offsets_and_pack_roundtrip():
    layout = FlatLayout.from_shapes({"x": (2, 3), "y": (), "z": (4,)})
    assert layout.offsets == (0, 6, 7) and layout.numel == 11
    assert layout.span("z") == slice(7, 11)
    state = {
        "x": torch.arange(6.0).view(2, 3),
        "y": torch.tensor(9.0),
        "z": torch.ones(4, dtype=torch.bfloat16),
    }
    back = unpack(layout, pack(layout, state), state)
    for name in state:
        assert torch.equal(back[name], state[name]) and back[name].dtype == state[name].dtype


def test_errors_name_the_tensor():
    layout = FlatLayout.from_shapes({"x": (2, 3)})
    buf = RoundBuffer.zeros(layout, 1, 1)
    with pytest.raises(KeyError, match="'nope' is not a tensor of the union model"):
        accumulate(buf, {"nope": torch.zeros(1)}, 1.0)
    with pytest.raises(ValueError, match=r"'x' has shape \(3, 2\)"):
        accumulate(buf, {"x": torch.zeros(3, 2)}, 1.0)


def test_bf16_transport_sends_updates_so_small_steps_survive():
    layout = FlatLayout.from_shapes({"norm.weight": (4,)})
    old = {"norm.weight": torch.ones(4)}
    upload = {"norm.weight": torch.full((4,), 1.002)}
    assert sends_deltas("bf16") and not sends_deltas("fp64")
    buf = RoundBuffer.zeros(layout, 1, 1)
    accumulate(buf, upload, 30.0, reference=old)
    all_reduce_round(_OneOfTwo(), buf, "bf16", "test")
    new = finalize(buf, old, deltas=True)["norm.weight"]
    assert (new - 1.002).abs().max().item() < 1e-5
    # the weights themselves would not survive: 1.002 is 1.0 in bf16
    assert torch.tensor(1.002).to(torch.bfloat16).item() == 1.0


def test_a_round_restricted_to_its_clients_tensors_gives_the_same_state():
    gen = torch.Generator().manual_seed(3)
    shapes = {"a": (3, 2), "b": (4,), "c": (2, 2), "d": (5,)}
    full = FlatLayout.from_shapes(shapes)
    old = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    uploads = [
        (7, {"a": torch.randn(3, 2, generator=gen), "c": torch.randn(2, 2, generator=gen)}),
        (2, {"c": torch.randn(2, 2, generator=gen)}),
    ]
    active = full.restrict({"c", "a"})
    assert active.names == ("a", "c") and active.numel == 10  # union order kept
    results = []
    for layout in (full, active):
        buf = RoundBuffer.zeros(layout, 2, 1, dtype=torch.float64)
        for weight, state in uploads:
            accumulate(buf, state, weight)
        updated = finalize(buf, {n: old[n] for n in layout.names})
        results.append({n: updated.get(n, old[n]) for n in shapes})
    assert all(torch.equal(results[0][n], results[1][n]) for n in shapes)
    with pytest.raises(KeyError, match="not tensors of the union model"):
        full.restrict({"zzz"})


@pytest.mark.parametrize(
    "dtype, deltas", [(torch.float64, False), (torch.float32, False), (torch.float32, True)]
)
def test_rounds_sharing_a_workspace_average_exactly_and_keep_their_states(dtype, deltas):
    """Buffers carved from one workspace, round after round, give the bits of value / count
    (old + value / count with deltas), and no returned tensor shares the workspace's memory."""
    gen = torch.Generator().manual_seed(5)
    shapes = {"a": (3, 2), "b": (40,), "c": (2, 2)}
    full, workspace, rounds = FlatLayout.from_shapes(shapes), Workspace(), []
    for names in ({"a", "b", "c"}, {"c"}, {"a", "b"}):  # smaller, then larger again
        layout = full.restrict(names)
        old = {n: torch.randn(shapes[n], generator=gen) for n in layout.names}
        uploads = [
            (w, {n: torch.randn(shapes[n], generator=gen) for n in layout.names}) for w in (3, 8)
        ]
        buf = RoundBuffer.zeros(layout, 2, 1, dtype=dtype, workspace=workspace)
        for weight, state in uploads:
            accumulate(buf, state, weight, old if deltas else None)
        new = finalize(buf, old, deltas)
        for name in layout.names:  # the sum a fresh zero buffer holds, then value / count
            total = torch.zeros(shapes[name], dtype=dtype)
            for weight, state in uploads:
                update = state[name].to(dtype) - (old[name].to(dtype) if deltas else 0)
                total.add_(update, alpha=weight)
            avg = total / sum(weight for weight, _ in uploads)
            expected = (old[name].to(dtype) + avg if deltas else avg).to(torch.float32)
            assert new[name].dtype == torch.float32 and torch.equal(new[name], expected)
        rounds.append((new, {n: t.clone() for n, t in new.items()}))
    for new, as_returned in rounds:  # later rounds reused the memory: nothing moved
        assert all(torch.equal(new[n], as_returned[n]) for n in new)


def test_a_workspace_reuses_its_memory_until_a_round_needs_more():
    workspace = Workspace()
    first = workspace.take(10, torch.float64, "cpu")
    assert workspace.take(4, torch.float64, "cpu").data_ptr() == first.data_ptr()
    assert workspace.take(11, torch.float64, "cpu").numel() == 11  # grown
    assert workspace.take(11, torch.float32, "cpu").dtype == torch.float32
