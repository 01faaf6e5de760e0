"""Several processes on this machine talking over gloo, rendezvous through a file."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from tapdist.dist import DistError, Launch, SingleProcessContext, TorchContext
from tapdist.dist.launch import free_port
from tapdist.fl.aggregate import (
    FlatLayout,
    RoundBuffer,
    accumulate,
    accumulation_dtype,
    all_reduce_round,
    finalize,
)

pytestmark = pytest.mark.multiproc

SHAPES = {"enc.weight": (5, 4), "shared.weight": (4, 4), "head.a": (3,), "head.b": (2, 2)}
# (weight, names held) per client; client c is trained by rank c % world
CLIENTS = [
    (40, ["enc.weight", "shared.weight", "head.a"]),
    (25, ["shared.weight", "head.b"]),
    (13, ["enc.weight", "head.b"]),
    (7, ["head.a"]),
    (31, ["enc.weight"]),
]


def connect(rank: int, world: int, store: str, timeout_s: float = 30.0) -> TorchContext:
    launch = Launch("torchrun", rank, world, rank, world)
    return TorchContext.create(
        "gloo",
        launch,
        torch.device("cpu"),
        init_method=f"file://{store}",
        timeout_s=timeout_s,
        init_timeout_s=30.0,
    )


def upload(client: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + client)
    return {n: torch.randn(SHAPES[n], generator=gen) for n in CLIENTS[client][1]}


def aggregate_on(ctx, world: int, rank: int, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    layout = FlatLayout.from_shapes(SHAPES)
    old = {n: torch.full(s, -1.0) for n, s in SHAPES.items()}
    buf = RoundBuffer.zeros(layout, len(CLIENTS), 1, dtype=accumulation_dtype(dtype))
    for client, (weight, _) in enumerate(CLIENTS):
        if client % world == rank:
            accumulate(buf, upload(client), weight)
            buf.stats[client, 0] = float(client) + 0.5
    all_reduce_round(ctx, buf, dtype, "test aggregation")
    assert buf.stats[:, 0].tolist() == [c + 0.5 for c in range(len(CLIENTS))]
    return finalize(buf, old)


def collectives_worker(rank: int, world: int, store: str, out: str) -> None:
    ctx = connect(rank, world, store)
    t = torch.full((3,), float(rank + 1))
    ctx.all_reduce(t, "sum")
    assert t.tolist() == [world * (world + 1) / 2] * 3
    b = torch.full((2,), float(rank))
    ctx.broadcast(b, src=world - 1, what="bcast")
    assert b.tolist() == [world - 1.0] * 2
    ctx.barrier("barrier")
    result = {dtype: aggregate_on(ctx, world, rank, dtype) for dtype in ("fp64", "fp32", "bf16")}
    torch.save(result, f"{out}.{rank}")
    ctx.close()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_collectives_and_aggregation_agree_at_any_world_size(tmp_path, world):
    out = str(tmp_path / "result")
    mp.spawn(collectives_worker, args=(world, str(tmp_path / "store"), out), nprocs=world)
    results = [torch.load(f"{out}.{r}") for r in range(world)]
    single = {d: aggregate_on(SingleProcessContext(), 1, 0, d) for d in ("fp64", "fp32")}
    for result in results:  # every rank ends with the same state
        for name in SHAPES:
            assert torch.equal(result["fp32"][name], results[0]["fp32"][name])
            assert (result["fp32"][name] - single["fp32"][name]).abs().max() <= 1e-6
            assert torch.equal(result["fp64"][name], single["fp64"][name])  # exact
            torch.testing.assert_close(
                result["bf16"][name], single["fp32"][name], rtol=2e-2, atol=2e-2
            )


def timeout_worker(rank: int, world: int, store: str, out: str) -> None:
    ctx = connect(rank, world, store, timeout_s=2.0)
    if rank == 1:
        time.sleep(6)  # never joins the collective
        return
    started = time.monotonic()
    try:
        ctx.all_reduce(torch.ones(4), "round 7 aggregation all_reduce")
    except DistError as err:
        with open(out, "w") as f:
            f.write(f"{time.monotonic() - started:.1f}\n{err}")
        ctx.abort(0)  # as `tapdist train` does: no teardown after a failed collective


def test_collective_timeout_names_rank_phase_and_cause(tmp_path):
    out = tmp_path / "error.txt"
    mp.spawn(timeout_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    waited, message = out.read_text().split("\n", 1)
    assert float(waited) < 6
    assert "rank 0/2" in message
    assert "round 7 aggregation all_reduce failed" in message
    assert "Likely cause: another rank stopped" in message


def test_failed_rendezvous_names_rank_phase_and_cause():
    port = free_port()
    launch = Launch("torchrun", 1, 2, 1, 2, "127.0.0.1", port)
    started = time.monotonic()
    with pytest.raises(DistError) as err:
        TorchContext.create(
            "gloo",
            launch,
            torch.device("cpu"),
            init_method=f"tcp://127.0.0.1:{port}",
            timeout_s=5,
            init_timeout_s=2,
        )
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert "rank 1/2" in message and f"rendezvous at tcp://127.0.0.1:{port}" in message
    assert "Likely cause: not every rank started" in message
