"""Virtual clients per rank: memory and round time of one rank hosting N clients.

TAP keeps a personal model for every client a rank hosts; in tapdist that is only the client's
trainable tensors (the frozen backbone is one resident module for all of them). For each N, a
fresh process (or each rank of a launched job) builds a synthetic federation of N identical
clients per rank with tapdist's round loop and runs: a round of ``--per-round`` clients (which
also makes every one-time allocation), a fill round in which every client trains (so each then
holds its personal model and its cached training samples), and timed rounds of ``--per-round``.

Reported per N: the exact bytes of a client's state (what the algorithm keeps for it, as a
checkpoint saves it) and of its training samples; the resident memory (RSS) before and after the
fill round and its growth per client the fill added; on CUDA the bytes torch has allocated on
the device before and after the fill and at the peak, and their growth per added client (what
clients keep on the device); the fill round's seconds per client and the median round time.

    python -m benchmarks.clients                                     # 10, 100, 1000 on the CPU
    python -m benchmarks.clients --set dist.device=cuda              # the same on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time

from benchmarks.common import (
    add_arguments,
    build_federation,
    config_path,
    describe,
    hardware,
    identical_clients,
    launched,
    markdown_table,
    median,
    memory_now,
    rank_command,
    run_main,
    run_ranks,
    save_rows,
    set_threads,
    shown,
    write_json,
)
from tapdist.config import Config, load_config
from tapdist.dist import init_context
from tapdist.fl.loop import RoundLoop


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config = config_path(args.config)
    load_config(args.config, args.overrides)  # a bad config stops here, before any rank starts
    if args.worker:
        save_rows(args.rows_out, worker(args))
        return 0
    hw = hardware()
    if launched():  # started by a launcher: every rank hosts each N in turn, rank 0 reports
        rows = worker(args)
        if rows is None:
            return 0
    else:
        rows = []
        for n in args.clients:
            print(f"clients: {n} per rank, {args.world} rank(s)", flush=True)
            worker_args = [*_worker_args(args), "--clients", str(n)]
            command = rank_command(
                args.launcher, args.world, "benchmarks.clients", worker_args, args.launcher_args
            )
            for row in run_ranks(command, args.threads):
                print(
                    f"  fill {row['fill_s']:.1f} s, round {row['round_s']:.3f} s, RSS "
                    f"{row['memory_after_fill']['rss'] / 1e6:.0f} MB",
                    flush=True,
                )
                rows.append(row)
    report(args, hw, rows)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.clients", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[10, 100, 1000],
        help="clients hosted per rank (default 10 100 1000), one fresh process each",
    )
    parser.add_argument(
        "--per-round", type=int, default=10, help="clients sampled per round and rank (default 10)"
    )
    parser.add_argument("--world", type=int, default=1, help="ranks (default 1)")
    parser.add_argument(
        "--config", default="configs/smoke.yaml", help="model and tasks (default the smoke config)"
    )
    parser.add_argument(
        "--tasks", nargs="+", default=["news"], help="the tasks of every client (default news)"
    )
    parser.add_argument("--samples", type=int, default=8, help="training samples per client")
    parser.add_argument(
        "--local-steps", type=int, default=1, help="train.local_steps of every client-round"
    )
    add_arguments(parser, "clients")
    return parser


def _worker_args(args: argparse.Namespace) -> list[str]:
    out = ["--worker", "--per-round", str(args.per_round), "--config", args.config]
    out += ["--tasks", *args.tasks, "--samples", str(args.samples)]
    out += ["--local-steps", str(args.local_steps), "--threads", str(args.threads)]
    for item in args.overrides:
        out += ["--set", item]
    return out


def federation_config(args: argparse.Namespace, clients: int, per_round: int) -> Config:
    return identical_clients(args, clients, per_round)


def worker(args: argparse.Namespace) -> list[dict] | None:
    """Every rank: host each N of ``args.clients`` in turn; rank 0 returns the rows."""
    set_threads(args.threads)
    ctx = init_context(load_config(args.config, args.overrides).dist)
    try:
        rows = [measure(args, ctx, n) for n in args.clients]
    finally:
        ctx.close()
    return rows if ctx.rank == 0 else None


def measure(args: argparse.Namespace, ctx, per_rank: int) -> dict:
    """Host ``per_rank`` clients on every rank: a first round of ``args.per_round`` clients per
    rank (it also makes every one-time allocation), then one round in which every client trains,
    then timed rounds of ``args.per_round``; memory readings of rank 0 between them."""
    total = per_rank * ctx.world_size
    cfg = federation_config(args, total, min(args.per_round * ctx.world_size, total))
    model, algorithm, topology = build_federation(cfg, ctx)
    loop = RoundLoop(cfg, ctx, model, algorithm, topology)
    state, _ = loop.round(0, loop.initial_state())
    mine = topology.clients_of(ctx.rank)
    first = sum(1 for c in mine if algorithm.client_state(c))  # clients holding a state now
    before = _memory(ctx)
    every = dataclasses.replace(
        cfg, federation=dataclasses.replace(cfg.federation, clients_per_round=total)
    )
    started = time.perf_counter()
    state, _ = RoundLoop(every, ctx, model, algorithm, topology).round(1, state)
    fill_s = time.perf_counter() - started
    filled = _memory(ctx)
    seconds = []
    for r in range(2, 2 + cfg.bench.warmup + cfg.bench.repeats):
        ctx.barrier(f"clients benchmark round {r}")
        state, record = loop.round(r, state)
        if r >= 2 + cfg.bench.warmup:
            seconds.append(record["seconds"]["round"])
    after = _memory(ctx)
    kept = [algorithm.client_state(c) for c in mine]
    data = [model.train_data(c) for c in mine]
    new = len(mine) - first  # clients whose state and samples the fill round added

    def growth(key: str) -> float | None:
        return (filled[key] - before[key]) / new if new and key in filled else None

    return {
        "clients_per_rank": len(mine),
        "world": ctx.world_size,
        "device": str(ctx.device),
        "state_bytes_per_client": sum(_nbytes(s.values()) for s in kept) / len(mine),
        "state_tensors_per_client": sum(len(s) for s in kept) / len(mine),
        "states_on": sorted({str(t.device) for s in kept for t in s.values()}),
        "data_bytes_per_client": sum(
            _nbytes(v for fields in d.values() for v in fields.values()) for d in data
        )
        / len(mine),
        "clients_added_by_fill": new,
        "memory_before_fill": before,
        "memory_after_fill": filled,
        "memory_after_rounds": after,
        "rss_growth_per_client": growth("rss"),
        "cuda_growth_per_client": growth("cuda_allocated"),
        "fill_s": fill_s,
        "fill_s_per_client": fill_s / len(mine),
        "per_round": cfg.federation.clients_per_round,
        "round_s": median(seconds),
    }


def _table_row(r: dict, cuda: bool) -> list[str]:
    per_client = r["state_bytes_per_client"] + r["data_bytes_per_client"]
    growth = r["rss_growth_per_client"]
    before, filled = r["memory_before_fill"], r["memory_after_fill"]
    line = [
        str(r["clients_per_rank"]),
        _kb(r["state_bytes_per_client"]),
        _kb(r["data_bytes_per_client"]),
        f"{before['rss'] / 1e6:.0f} / {filled['rss'] / 1e6:.0f} MB",
        _kb(growth),
        "-" if growth is None else f"{growth / per_client:.2f}",
        f"{1e3 * r['fill_s_per_client']:.0f} ms",
        f"{r['round_s']:.3f} ({r['per_round']} clients)",
    ]
    if cuda:
        peak = r["memory_after_rounds"]["cuda_peak_allocated"]
        line[6:6] = [
            f"{before['cuda_allocated'] / 1e6:.1f} / {filled['cuda_allocated'] / 1e6:.1f}, "
            f"{peak / 1e6:.1f} MB",
            _kb(r["cuda_growth_per_client"]),
        ]
    return line


def _kb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e3:.1f} kB"


def _memory(ctx) -> dict[str, int]:
    gc.collect()
    ctx.barrier("clients benchmark memory reading")
    return memory_now(ctx.device)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def report(args: argparse.Namespace, hw: dict, rows: list[dict]) -> None:
    cfg = load_config(args.config, args.overrides)
    world = rows[0]["world"] if rows else args.world  # a launcher's job may differ from --world
    print(
        f"{describe(hw)}. `{shown(args.config)}`, every client: {'+'.join(args.tasks)}, "
        f"{args.samples} samples, {args.local_steps} local step(s), algorithm "
        f"{cfg.federation.algorithm}; {world} rank(s), {args.threads} thread(s) each; round "
        f"time: median of {cfg.bench.repeats} rounds after {cfg.bench.warmup}.\n"
    )
    cuda = any("cuda_allocated" in r["memory_after_fill"] for r in rows)
    headers = [
        "clients per rank", "state per client", "samples per client", "RSS before / after fill",
        "RSS growth per added client", "growth / (state + samples)", "fill round: s per client",
        "round s",
    ]  # fmt: skip
    if cuda:
        headers[6:6] = ["CUDA allocated: before / after fill, peak", "CUDA growth per client"]
    body = [_table_row(r, cuda) for r in rows]
    print(markdown_table(headers, body))
    where = sorted({d for r in rows for d in r["states_on"]})
    print(f"\nClient states are kept on: {', '.join(where)}.")
    payload = {
        "benchmark": "clients",
        "command": "python -m benchmarks.clients " + " ".join(sys.argv[1:]),
        "hardware": hw,
        "settings": {
            "config": shown(args.config),
            "tasks": args.tasks,
            "samples": args.samples,
            "local_steps": args.local_steps,
            "per_round": args.per_round,
            "world": world,
            "threads_per_rank": args.threads,
            "warmup": cfg.bench.warmup,
            "repeats": cfg.bench.repeats,
            "overrides": args.overrides,
        },
        "rows": rows,
    }
    print(f"\nwrote {write_json(args.json, payload)}")


if __name__ == "__main__":
    sys.exit(run_main(main))
