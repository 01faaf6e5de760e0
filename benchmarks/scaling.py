"""Scaling: round throughput of tapdist's round loop over world sizes, weak and strong.

Every rank runs the real round loop (``RoundLoop`` over the registered model and algorithm, as
``tapdist train`` builds them) on a small synthetic federation of identical clients: the same
tasks, samples and local steps, so one client-round is a fixed amount of work, and every client
is sampled in every round.

- weak: each rank hosts ``--clients-per-rank`` clients, so the clients per round grow with the
  ranks; efficiency ``t(1) / t(N)``.
- strong: ``--clients`` clients per round, split over the ranks (default: as many as the largest
  world size, at least 4, so no rank idles); efficiency ``t(1) / (N t(N))``. With fewer clients
  than ranks the extra ranks idle and the efficiency shows it.

``t(N)`` is the round time on N ranks: rank 0's seconds per round from the loop's metrics record
(training, the all_reduce that waits for the slowest rank, averaging), median over
``bench.repeats`` rounds after ``bench.warmup``. Efficiencies are relative to the smallest world
size measured; 1.0 is perfect scaling. Each rank runs ``--threads`` intra-op threads (default 1);
more ranks on a node than its cores oversubscribe the CPU, and the table says so. Each world
size's rows are written to the JSON as soon as they are measured, so a failing larger world keeps
the smaller ones.

    python -m benchmarks.scaling                                # gloo, 1 2 4 local ranks
    python -m benchmarks.scaling --world 1 2 4 8 --set dist.device=cuda   # one rank per GPU
    sbatch --nodes=2 --ntasks-per-node=4 slurm/bench_scaling.sbatch      # srun, several nodes
"""

from __future__ import annotations

import argparse
import os
import sys

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
    rank_command,
    run_main,
    run_ranks,
    save_rows,
    set_threads,
    shown,
    write_json,
)
from tapdist.config import Config, load_config
from tapdist.dist import detect_launch, init_context
from tapdist.fl.loop import RoundLoop

MODES = ("weak", "strong")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config = config_path(args.config)
    load_config(args.config, args.overrides)  # a bad config stops here, before any rank starts
    if args.worker:
        save_rows(args.rows_out, worker(args))
        return 0
    hw = hardware()
    if launched():  # srun/mpirun/torchrun started this script: one world size, rank 0 reports
        rows = worker(args)
        if rows is None:
            return 0
        args.launcher = rows[0]["launcher"]  # what started this job, not the driver's option
        report(args, hw, add_efficiency(rows))
        return 0
    if args.clients is None:
        args.clients = max(4, *args.world)
    rows = []
    for world in args.world:
        print(f"scaling: {world} rank(s), {' and '.join(args.modes)}", flush=True)
        command = rank_command(
            args.launcher, world, "benchmarks.scaling", _worker_args(args), args.launcher_args
        )
        for row in run_ranks(command, args.threads):
            print(f"  {row['mode']}: {row['round_s']:.3f} s per round", flush=True)
            rows.append(row)
        if world != args.world[-1]:
            write_json(args.json, _payload(args, hw, add_efficiency(rows)))
    report(args, hw, add_efficiency(rows))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--world", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--config", default="configs/smoke.yaml", help="model and tasks (default the smoke config)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["objects", "news"],
        help="the tasks of every client, from the config's data.tasks (default objects news)",
    )
    parser.add_argument("--samples", type=int, default=32, help="training samples per client")
    parser.add_argument(
        "--local-steps", type=int, default=2, help="train.local_steps of every client-round"
    )
    parser.add_argument(
        "--clients-per-rank", type=int, default=2, help="weak scaling: clients each rank hosts"
    )
    parser.add_argument(
        "--clients",
        type=int,
        help="strong scaling: clients per round, all ranks (default the largest world size, "
        "at least 4)",
    )
    add_arguments(parser, "scaling")
    return parser


def _worker_args(args: argparse.Namespace) -> list[str]:
    out = ["--worker", "--modes", *args.modes, "--config", args.config, "--tasks", *args.tasks]
    out += ["--samples", str(args.samples), "--local-steps", str(args.local_steps)]
    out += ["--clients-per-rank", str(args.clients_per_rank), "--clients", str(args.clients)]
    out += ["--threads", str(args.threads)]
    for item in args.overrides:
        out += ["--set", item]
    return out


def federation_config(args: argparse.Namespace, mode: str, world: int) -> Config:
    """``args.config`` with ``clients`` identical clients, all of them in every round."""
    if mode == "weak":
        clients = args.clients_per_rank * world
    else:
        clients = args.clients if args.clients is not None else max(4, world)
    idle = ["dist.allow_idle_ranks=true"] if clients < world else []  # strong, past its clients
    return identical_clients(args, clients, clients, idle)


def worker(args: argparse.Namespace) -> list[dict] | None:
    """Every rank: time the rounds of each mode at this world size; rank 0 returns the rows."""
    set_threads(args.threads)
    ctx = init_context(load_config(args.config, args.overrides).dist)
    where = {
        "launcher": ctx.launcher,
        "ranks_per_node": detect_launch().local_world_size,
        "cores_per_node": os.cpu_count(),
    }
    rows = []
    try:
        for mode in args.modes:
            cfg = federation_config(args, mode, ctx.world_size)
            rows.append({"mode": mode, **time_rounds(cfg, ctx), **where})
    finally:
        ctx.close()
    return rows if ctx.rank == 0 else None


def time_rounds(cfg: Config, ctx) -> dict:
    """Median seconds of the loop's rounds after the warm-up ones, from its metrics records."""
    model, algorithm, topology = build_federation(cfg, ctx)
    loop = RoundLoop(cfg, ctx, model, algorithm, topology)
    state = loop.initial_state()
    seconds = []
    for r in range(cfg.bench.warmup + cfg.bench.repeats):
        ctx.barrier(f"scaling benchmark round {r}")
        state, record = loop.round(r, state)
        if r >= cfg.bench.warmup:
            seconds.append({**record["seconds"], "bytes": record["bytes_sent_per_rank"]})
    clients = cfg.federation.clients_per_round
    round_s = median([s["round"] for s in seconds])
    return {
        "world": ctx.world_size,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "clients_per_round": clients,
        "clients_per_rank": [len(topology.clients_of(r)) for r in range(ctx.world_size)],
        "round_s": round_s,
        "train_slowest_rank_s": median([s["train_max_rank"] for s in seconds]),
        "aggregate_s": median([s["aggregate"] for s in seconds]),
        "bytes_sent_per_rank": seconds[-1]["bytes"],
        "client_rounds_per_s": clients / round_s,
        "rounds": [s["round"] for s in seconds],
    }


def add_efficiency(rows: list[dict]) -> list[dict]:
    """Each row's efficiency against the smallest world size of its mode (weak: t0 / t;
    strong: w0 t0 / (w t)) and its speedup (client-rounds per second over the smallest's)."""
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        base = min(mine, key=lambda r: r["world"])
        for r in mine:
            ratio = base["round_s"] / r["round_s"]
            r["efficiency"] = ratio if mode == "weak" else ratio * base["world"] / r["world"]
            r["speedup"] = r["client_rounds_per_s"] / base["client_rounds_per_s"]
    return rows


def oversubscribed(rows: list[dict], threads: int) -> list[int]:
    """World sizes whose CPU ranks on a node, times their threads, outnumber its cores."""
    return sorted(
        {
            r["world"]
            for r in rows
            if r["device"] == "cpu" and r["ranks_per_node"] * threads > r["cores_per_node"]
        }
    )


def report(args: argparse.Namespace, hw: dict, rows: list[dict]) -> None:
    cfg = load_config(args.config, args.overrides)
    over = oversubscribed(rows, args.threads)
    note = ""
    if over:
        note = (
            f" World sizes {over} put more ranks x threads ({args.threads} per rank) on a "
            "node than it has cores: their efficiency measures sharing cores, not the runtime."
        )
    print(
        f"{describe(hw)}. `{shown(args.config)}`, every client: {'+'.join(args.tasks)}, "
        f"{args.samples} samples, {args.local_steps} local steps, algorithm "
        f"{cfg.federation.algorithm}; {args.threads} thread(s) per rank; median of "
        f"{cfg.bench.repeats} rounds after {cfg.bench.warmup}.{note}\n"
    )
    headers = [
        "mode", "ranks", "clients per round", "round s", "train s (slowest rank)",
        "aggregate s", "client-rounds/s", "speedup", "efficiency",
    ]  # fmt: skip
    body = [
        [
            r["mode"],
            r["world"],
            r["clients_per_round"],
            f"{r['round_s']:.3f}",
            f"{r['train_slowest_rank_s']:.3f}",
            f"{r['aggregate_s']:.4f}",
            f"{r['client_rounds_per_s']:.2f}",
            f"{r['speedup']:.2f}",
            f"{r['efficiency']:.2f}",
        ]
        for r in sorted(rows, key=lambda r: (MODES.index(r["mode"]), r["world"]))
    ]
    print(markdown_table(headers, body))
    print(f"\nwrote {write_json(args.json, _payload(args, hw, rows))}")


def _payload(args: argparse.Namespace, hw: dict, rows: list[dict]) -> dict:
    cfg = load_config(args.config, args.overrides)
    return {
        "benchmark": "scaling",
        "command": "python -m benchmarks.scaling " + " ".join(sys.argv[1:]),
        "hardware": hw,
        "settings": {
            "config": shown(args.config),
            "tasks": args.tasks,
            "samples": args.samples,
            "local_steps": args.local_steps,
            "clients_per_rank_weak": args.clients_per_rank,
            "clients_strong": args.clients,
            "threads_per_rank": args.threads,
            "launcher": args.launcher,
            "warmup": cfg.bench.warmup,
            "repeats": cfg.bench.repeats,
            "overrides": args.overrides,
            "oversubscribed_world_sizes": oversubscribed(rows, args.threads),
        },
        "rows": rows,
    }


if __name__ == "__main__":
    sys.exit(run_main(main))
