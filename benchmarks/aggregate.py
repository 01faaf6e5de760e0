"""Cost of one aggregation round: pack uploads, one all_reduce, average.

Each rank packs ``--clients-per-rank`` uploads into the round buffer (every client holds a random
60% of the union's tensors), joins the all_reduce, and finalizes the averaged state. Reported per
phase (median over ``bench.repeats`` rounds after ``bench.warmup``), with the all_reduce's
algorithm bandwidth (buffer bytes / seconds).

    python benchmarks/aggregate.py --world 1 2 3 --params 11.4e6 --tensors 800

runs itself under torchrun for each world size and prints a Markdown table. Append the table to
benchmarks/RESULTS.md with the hardware it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--world",
        type=int,
        nargs="+",
        default=[1, 2],
        help="world sizes to run (each under torchrun)",
    )
    parser.add_argument(
        "--params", type=float, default=11.4e6, help="trainable parameters in the union model"
    )
    parser.add_argument("--tensors", type=int, default=800, help="trainable tensors in it")
    parser.add_argument("--clients-per-rank", type=int, default=1)
    parser.add_argument("--dtype", nargs="+", default=["fp64", "fp32", "bf16"])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl", "mpi"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="config overrides, e.g. bench.repeats=20",
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        drive(args)


def drive(args: argparse.Namespace) -> None:
    rows = []
    for world in args.world:
        for dtype in args.dtype:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={world}",
                "--master_addr=127.0.0.1",
                f"--master_port={29400 + world}",
                __file__,
                "--worker",
                "--params",
                str(args.params),
                "--tensors",
                str(args.tensors),
                "--clients-per-rank",
                str(args.clients_per_rank),
                "--dtype",
                dtype,
                "--backend",
                args.backend,
            ]
            for item in args.overrides:
                cmd += ["--set", item]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"world size {world}, {dtype} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"Host: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}; "
        f"torch {torch.__version__}; backend {args.backend}; "
        f"{args.params / 1e6:.1f}M parameters in {args.tensors} tensors, "
        f"{args.clients_per_rank} client(s) per rank\n"
    )
    print(
        "| ranks | wire dtype | bytes/rank | pack ms | all_reduce ms | finalize ms | "
        "round ms | all_reduce GB/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['world']} | {r['dtype']} | {r['bytes'] / 1e6:.1f} MB | {r['pack'] * 1e3:.1f} "
            f"| {r['reduce'] * 1e3:.1f} | {r['finalize'] * 1e3:.1f} | {r['total'] * 1e3:.1f} "
            f"| {r['bytes'] / r['reduce'] / 1e9 if r['world'] > 1 else 0:.2f} |"
        )


def worker(args: argparse.Namespace) -> None:
    from tapdist.config import load_config
    from tapdist.dist import init_context
    from tapdist.fl.aggregate import (
        FlatLayout,
        RoundBuffer,
        accumulate,
        accumulation_dtype,
        all_reduce_round,
        finalize,
    )

    dtype = args.dtype[0]
    cfg = load_config(
        None, [f"dist.backend={args.backend}", f"dist.transport_dtype={dtype}", *args.overrides]
    )
    ctx = init_context(cfg.dist)
    shapes = union_shapes(int(args.params), args.tensors)
    layout = FlatLayout.from_shapes(shapes)
    gen = torch.Generator().manual_seed(ctx.rank)
    state = {n: torch.randn(s, generator=gen).to(ctx.device) for n, s in shapes.items()}
    uploads = []
    for _ in range(args.clients_per_rank):
        keep = torch.rand(len(shapes), generator=gen) < 0.6
        uploads.append({n: state[n] for n, k in zip(shapes, keep) if k})
    times = {"pack": [], "reduce": [], "finalize": [], "total": []}
    for step in range(cfg.bench.warmup + cfg.bench.repeats):
        ctx.barrier("bench step")
        t0 = time.perf_counter()
        n_clients = ctx.world_size * args.clients_per_rank
        buf = RoundBuffer.zeros(layout, n_clients, 2, ctx.device, accumulation_dtype(dtype))
        for upload in uploads:
            accumulate(buf, upload, 100.0)
        t1 = _sync(ctx)
        sent = all_reduce_round(ctx, buf, dtype, "bench all_reduce")
        t2 = _sync(ctx)
        finalize(buf, state)
        t3 = _sync(ctx)
        if step >= cfg.bench.warmup:
            for key, value in (
                ("pack", t1 - t0),
                ("reduce", t2 - t1),
                ("finalize", t3 - t2),
                ("total", t3 - t0),
            ):
                times[key].append(value)
    if ctx.rank == 0:
        row = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({"world": ctx.world_size, "dtype": dtype, "bytes": sent, **row}))
    ctx.close()


def union_shapes(params: int, tensors: int) -> dict[str, tuple[int, ...]]:
    """LoRA-like tensors: pairs of (r x d) and (d x r) blocks summing to about ``params``."""
    rank = 8
    d = max(1, params // (tensors * rank))
    shapes = {}
    for i in range(tensors // 2):
        shapes[f"layer{i}.lora_A"] = (rank, d)
        shapes[f"layer{i}.lora_B"] = (d, rank)
    return shapes


def _sync(ctx) -> float:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return time.perf_counter()


if __name__ == "__main__":
    main()
