"""Communication: tapdist's aggregation against a raw all_reduce, and bytes per client per round.

Timing, per backend, world size and wire dtype: the ranks run the round loop's aggregation path
(tapdist.fl.aggregate) on a config's real union layout: each rank packs the uploads of the
round's sampled clients it hosts into the flat buffer (``accumulate``), joins ``all_reduce_round``
and averages (``finalize``); in the same repetition they all_reduce one plain tensor of the same
bytes. Reported: medians of each phase on its slowest rank (ranks pack different numbers of
uploads), bandwidth (bytes on the wire / seconds) and efficiency (raw seconds / union seconds)
of the whole path (slowest packing + collective + slowest averaging) and of its collective alone
(timed after a barrier, so a rank that packs less does not count its wait for the others). One
rank sends nothing (tapdist skips the collective), so its rows show the packing and averaging
only.

Counting, per config (nothing is timed or allocated: the model is built on the meta device):
what each client's trainable sub-state occupies on the wire in each dtype (values and one count
slot per tensor), against uploading its whole model in fp32, every parameter its forward reads,
frozen backbone included, as a full state-dict upload does.

    python -m benchmarks.comm                                  # gloo, 1-3 ranks on this host
    python -m benchmarks.comm --backend nccl --world 1 2 4 8   # one rank per GPU
    python -m benchmarks.comm --backend mpi --world 2 3        # mpiexec, mpi4py Allreduce
    mpiexec -n 4 python -m benchmarks.comm --backend mpi       # or under any launcher
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    BenchmarkError,
    add_arguments,
    config_path,
    describe,
    hardware,
    launched,
    markdown_table,
    median,
    meta_union_model,
    rank_command,
    run_main,
    run_ranks,
    save_rows,
    set_threads,
    shown,
    write_json,
)
from tapdist.config import load_config
from tapdist.data.spec import parse_clients
from tapdist.dist import init_context
from tapdist.fl.aggregate import (
    FlatLayout,
    RoundBuffer,
    Workspace,
    accumulate,
    accumulation_dtype,
    all_reduce_round,
    finalize,
    sends_deltas,
)
from tapdist.fl.topology import Topology, sample_clients
from tapdist.info import frozen_used

DTYPES = ("fp64", "fp32", "bf16")
PAPER_CONFIGS = ("configs/paper_flava.yaml", "configs/paper_vilt.yaml")
TARGET_EFFICIENCY = 0.9  # of the raw all_reduce's bandwidth
TARGET_SHRINK = 30  # the full upload over the wire bytes of a client's trainable sub-state
_TORCH_DTYPE = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config = config_path(args.config)
    load_config(args.config, args.overrides)  # a bad config stops here, before any rank starts
    args.bytes_configs = [config_path(p) for p in args.bytes_configs]
    if args.worker:
        save_rows(args.rows_out, worker(args))
        return 0
    hw = hardware()
    if launched():  # started by srun/mpirun/torchrun: measure this world size, rank 0 reports
        if len(args.backend) > 1:
            raise BenchmarkError("under a launcher, give one --backend (this job's)")
        args.backend = [_resolve_backend(args.backend[0])]
        rows = worker(args)
        if rows is None:
            return 0
    else:
        rows = drive(args)
    counts = [row for path in args.bytes_configs for row in client_bytes(path)]
    report(args, hw, rows, counts)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.comm", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        default=["auto"],
        choices=("auto", "gloo", "nccl", "mpi"),
        help="collective backends to time (auto: nccl with CUDA, else gloo)",
    )
    parser.add_argument(
        "--world", type=int, nargs="*", default=[1, 2, 3], help="world sizes (default 1 2 3)"
    )
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument(
        "--config",
        default=PAPER_CONFIGS[0],
        help="config whose union layout and round sample are timed (default paper_flava)",
    )
    parser.add_argument(
        "--round",
        default="median",
        help="round whose sampled clients upload: a number, or median (default): the first round "
        "whose buffer has the median size over the config's rounds",
    )
    parser.add_argument(
        "--bytes-configs",
        nargs="*",
        default=list(PAPER_CONFIGS),
        help="configs whose clients' bytes per round are counted (default both paper configs)",
    )
    add_arguments(parser, "comm")
    return parser


# --- driver ---------------------------------------------------------------------------------------


def drive(args: argparse.Namespace) -> list[dict]:
    """Start the ranks once per backend and world size; collect rank 0's rows."""
    rows = []
    for backend in dict.fromkeys(_resolve_backend(b) for b in args.backend):
        dtypes = _dtypes_for(backend, args.dtype)
        if not dtypes:
            continue
        for world in args.world:
            if backend == "nccl" and args.launcher == "torchrun":
                gpus = torch.cuda.device_count()
                if world > gpus:
                    print(f"note: {world} NCCL ranks need {world} GPUs, this host has {gpus}")
                    continue
            launcher = "mpiexec" if backend == "mpi" and args.launcher == "torchrun" else None
            command = rank_command(
                launcher or args.launcher,
                world,
                "benchmarks.comm",
                _worker_args(args, backend, dtypes),
                args.launcher_args,
            )
            print(f"comm: {backend}, {world} rank(s), {' '.join(dtypes)}", flush=True)
            for row in run_ranks(command, args.threads):
                print(
                    f"  {row['dtype']}: union {row['union_ms']:.1f} ms, raw {row['raw_ms']:.1f} ms"
                )
                rows.append(row)
    return rows


def _worker_args(args: argparse.Namespace, backend: str, dtypes: list[str]) -> list[str]:
    out = ["--worker", "--backend", backend, "--dtype", *dtypes, "--config", args.config]
    out += ["--round", str(args.round), "--threads", str(args.threads)]
    for item in args.overrides:
        out += ["--set", item]
    return out


def _dtypes_for(backend: str, dtypes: list[str]) -> list[str]:
    """The wire dtypes ``backend`` can sum: MPI has no bfloat16 sum, so it skips bf16."""
    if backend == "mpi" and "bf16" in dtypes:
        print("note: the MPI transport has no bfloat16 sum; bf16 is skipped for mpi", flush=True)
        return [d for d in dtypes if d != "bf16"]
    return list(dtypes)


def _resolve_backend(choice: str) -> str:
    if choice == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return choice


# --- one world size -------------------------------------------------------------------------------


@dataclass
class Round:
    """The round every rank aggregates: its layout, the old global tensors, this rank's
    uploads with their weights (sample counts), and what the buffer carries besides."""

    index: int  # the round of the config's schedule
    layout: FlatLayout  # the tensors the sampled clients hold
    state: dict[str, torch.Tensor]
    uploads: list[tuple[dict[str, torch.Tensor], float]]
    sampled: list[int]
    stats: int  # metrics per client in the buffer


def worker(args: argparse.Namespace) -> list[dict] | None:
    """Every rank: time each wire dtype on this world size; rank 0 returns the rows."""
    set_threads(args.threads)
    backend = args.backend[0]
    args.dtype = _dtypes_for(backend, args.dtype)
    cfg = load_config(args.config, [f"dist.backend={backend}", *args.overrides])
    ctx = init_context(cfg.dist)
    try:
        work = round_of(cfg, ctx, args.round)
        rows = [
            measure(ctx, work, dtype, cfg.bench.warmup, cfg.bench.repeats) for dtype in args.dtype
        ]
    finally:
        ctx.close()
    for row in rows:
        row.update(backend=ctx.backend if ctx.is_distributed else backend, world=ctx.world_size)
    return rows if ctx.rank == 0 else None


def round_of(cfg, ctx, which: str) -> Round:
    """Round ``which`` of ``cfg`` (a number, or ``median``: the first round whose buffer has the
    median size over the schedule): its sampled clients, placed on ranks as a run places them,
    with random values in the union layout's shapes."""
    if not cfg.data.clients:
        raise BenchmarkError(f"{cfg.source}: list the clients under data.clients to time a round")
    model = meta_union_model(cfg)
    clients = parse_clients(cfg.data, list(model.tasks.values()))
    keys = [model.client_names(c.tasks) for c in clients]
    union = FlatLayout.from_shapes(
        {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    )
    index = median_round(cfg, union, keys) if which == "median" else int(which)
    sampled = sample_clients(cfg.run.seed, index, len(clients), cfg.federation.clients_per_round)
    sizes = tuple(c.samples for c in clients)
    d = cfg.dist
    topology = Topology(ctx.world_size, sizes, d.server_hosts_clients, d.placement, True)
    layout = union.restrict({k for c in sampled for k in keys[c]})
    gen = torch.Generator().manual_seed(cfg.run.seed + ctx.rank)
    state = {n: _random(s, gen, ctx.device) for n, s in zip(layout.names, layout.shapes)}
    uploads = [
        (
            {k: state[k] + 1e-3 * _random(state[k].shape, gen, ctx.device) for k in keys[c]},
            float(sizes[c]),
        )
        for c in sampled
        if topology.host_of[c] == ctx.rank
    ]
    # TAP's per-client metrics: global loss, personal loss and replaced per task, 4 timings
    return Round(index, layout, state, uploads, sampled, 3 * len(model.tasks) + 4)


def median_round(cfg, union: FlatLayout, keys: list[list[str]]) -> int:
    """The first round of ``federation.rounds`` whose sampled clients hold the median number
    of parameters (a typical round's buffer)."""
    fed = cfg.federation
    sizes = []
    for r in range(fed.rounds):
        sampled = sample_clients(cfg.run.seed, r, len(keys), fed.clients_per_round)
        sizes.append(union.restrict({k for c in sampled for k in keys[c]}).numel)
    return sizes.index(sorted(sizes)[(len(sizes) - 1) // 2])


def _random(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device)


PHASES = ("pack", "all_reduce", "finalize", "raw")


def measure(ctx, work: Round, dtype: str, warmup: int, repeats: int) -> dict:
    """Median seconds of each phase of the union path and of a raw all_reduce of the bytes the
    union path put on the wire, each repetition's phase taken on its slowest rank (a rank that
    hosts none of the round's clients packs nothing, the one that hosts most packs longest)."""
    mine = torch.zeros(repeats, ctx.world_size, len(PHASES), dtype=torch.float64)
    raw, workspace = None, Workspace()
    for i in range(warmup + repeats):
        ctx.barrier("comm benchmark: union")
        sent, times = union_round(ctx, work, dtype, workspace)
        if raw is None:
            size = _TORCH_DTYPE[dtype].itemsize
            raw = torch.zeros(sent // size, dtype=_TORCH_DTYPE[dtype], device=ctx.device)
        ctx.barrier("comm benchmark: raw")
        started = _clock(ctx)
        if ctx.is_distributed:
            ctx.all_reduce(raw, "comm benchmark: raw all_reduce")
        times["raw"] = _clock(ctx) - started
        if i >= warmup:
            mine[i - warmup, ctx.rank] = torch.tensor([times[k] for k in PHASES])
    every = mine.to(ctx.device)  # each rank fills its own column; the sum gathers them
    if ctx.is_distributed:
        ctx.all_reduce(every, "comm benchmark: phase times")
    slowest = every.amax(dim=1).cpu()  # (repeats, phases): each phase on its slowest rank
    phases = {k: median(slowest[:, j].tolist()) for j, k in enumerate(PHASES)}
    union = median(slowest[:, :3].sum(dim=1).tolist())
    row = _row(work, dtype, sent, ctx.world_size, phases, union)
    row["uploads_per_rank"] = _uploads_per_rank(ctx, work)
    return row


def _uploads_per_rank(ctx, work: Round) -> list[int]:
    counts = torch.zeros(ctx.world_size, dtype=torch.float64, device=ctx.device)
    counts[ctx.rank] = len(work.uploads)
    if ctx.is_distributed:
        ctx.all_reduce(counts, "comm benchmark: uploads per rank")
    return [int(c) for c in counts.tolist()]


def union_round(ctx, work: Round, dtype: str, workspace: Workspace) -> tuple[int, dict[str, float]]:
    """The round loop's aggregation: pack this rank's uploads, one all_reduce, average (the
    buffer in memory reused round after round, as the loop's). Returns the bytes put on the
    wire and the seconds of each phase."""
    deltas = sends_deltas(dtype)
    t0 = _clock(ctx)
    buf = RoundBuffer.zeros(
        work.layout, len(work.sampled), work.stats, ctx.device, accumulation_dtype(dtype), workspace
    )
    for upload, weight in work.uploads:
        accumulate(buf, upload, weight, work.state if deltas else None)
    packed = _clock(ctx)
    # ranks pack different clients: line them up so the collective's time is its own, not the
    # wait for the slowest packer (the round loop has no barrier here; its time is the sum)
    ctx.barrier("comm benchmark: packed")
    t1 = _clock(ctx)
    sent = all_reduce_round(ctx, buf, dtype, "comm benchmark: union all_reduce")
    t2 = _clock(ctx)
    finalize(buf, work.state, deltas)
    t3 = _clock(ctx)
    return sent, {"pack": packed - t0, "all_reduce": t2 - t1, "finalize": t3 - t2}


def _row(work: Round, dtype: str, wire: int, world: int, sec: dict, union_s: float) -> dict:
    sends = wire > 0

    def rate(seconds: float) -> float | None:
        return wire / seconds / 1e9 if sends and seconds > 0 else None

    raw = rate(sec["raw"])
    return {
        "dtype": dtype,
        "round": work.index,
        "round_clients": work.sampled,
        "round_params": work.layout.numel,
        "round_tensors": len(work.layout),
        "wire_bytes": wire,
        "pack_ms": 1e3 * sec["pack"],
        "all_reduce_ms": 1e3 * sec["all_reduce"],
        "finalize_ms": 1e3 * sec["finalize"],
        "union_ms": 1e3 * union_s,
        "raw_ms": 1e3 * sec["raw"],
        "union_gbps": rate(union_s),
        "union_all_reduce_gbps": rate(sec["all_reduce"]),
        "raw_gbps": raw,
        # NCCL's bus bandwidth: what a ring all_reduce moves per link, comparable across sizes
        "raw_busbw_gbps": raw * 2 * (world - 1) / world if raw else None,
        "efficiency": sec["raw"] / union_s if sends else None,
        "all_reduce_efficiency": sec["raw"] / sec["all_reduce"] if sends else None,
    }


def _clock(ctx) -> float:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return time.perf_counter()


# --- bytes per client -----------------------------------------------------------------------------


def client_bytes(path: str) -> list[dict]:
    """Per client of ``path``: its trainable sub-state on the wire in each dtype against a
    full fp32 upload of every parameter its model reads."""
    cfg = load_config(path)
    model = meta_union_model(cfg)
    params = dict(model.named_parameters())
    rows = []
    for client in parse_clients(cfg.data, list(model.tasks.values())):
        names = model.client_names(client.tasks)
        trainable = sum(params[n].numel() for n in names)
        frozen = frozen_used(model, client.tasks)
        full = 4 * (trainable + frozen)
        wire = {
            "fp64": 8 * (trainable + len(names)),
            "fp32": 4 * (trainable + len(names)),
            "bf16": 2 * trainable + 4 * len(names),
        }
        rows.append(
            {
                "config": shown(path),
                "client": client.id,
                "tasks": list(client.tasks),
                "trainable_params": trainable,
                "tensors": len(names),
                "frozen_params": frozen,
                "full_upload_bytes": full,
                "wire_bytes": wire,
                "shrink": {d: full / b for d, b in wire.items()},
            }
        )
    return rows


# --- report ---------------------------------------------------------------------------------------


def report(args: argparse.Namespace, hw: dict, rows: list[dict], counts: list[dict]) -> None:
    bench = load_config(args.config, args.overrides).bench
    parts = []
    if rows:
        first = rows[0]
        parts += [
            "## Aggregation against a raw all_reduce",
            "",
            f"{describe(hw)}. `{shown(args.config)}`, round {first['round']}: clients "
            f"{first['round_clients']}, {first['round_params'] / 1e6:.1f}M parameters in "
            f"{first['round_tensors']} tensors; {args.threads} thread(s) per rank; median of "
            f"{bench.repeats} after {bench.warmup} warm-up, each phase on its slowest rank. "
            "Efficiency: raw all_reduce seconds over the union path's (whole: pack + all_reduce "
            "+ average; collective: its all_reduce alone, started after a barrier).",
            "",
            timing_table(rows),
            "",
        ]
    if counts:
        parts += [
            "## Bytes per client per round",
            "",
            bytes_table(counts),
            "",
            bytes_summary(counts),
        ]
    print("\n".join(parts), flush=True)
    payload = {
        "benchmark": "comm",
        "command": "python -m benchmarks.comm " + " ".join(sys.argv[1:]),
        "hardware": hw,
        "settings": {
            "config": shown(args.config),
            "round": rows[0]["round"] if rows else args.round,
            "threads_per_rank": args.threads,
            "warmup": bench.warmup,
            "repeats": bench.repeats,
            "overrides": args.overrides,
        },
        "targets": {"efficiency": TARGET_EFFICIENCY, "shrink": TARGET_SHRINK},
        "timing": rows,
        "client_bytes": counts,
        "client_bytes_summary": summarize(counts),
    }
    print(f"\nwrote {write_json(args.json, payload)}")


def timing_table(rows: list[dict]) -> str:
    headers = [
        "backend", "ranks", "uploads per rank", "wire", "MB on wire", "pack ms", "all_reduce ms",
        "average ms", "union ms", "raw all_reduce ms", "union GB/s", "raw GB/s",
        "efficiency: whole", "efficiency: collective",
    ]  # fmt: skip
    body = [
        [
            r["backend"],
            r["world"],
            "/".join(str(n) for n in r["uploads_per_rank"]),
            r["dtype"],
            f"{r['wire_bytes'] / 1e6:.1f}",
            f"{r['pack_ms']:.1f}",
            f"{r['all_reduce_ms']:.1f}",
            f"{r['finalize_ms']:.1f}",
            f"{r['union_ms']:.1f}",
            f"{r['raw_ms']:.1f}",
            _maybe(r["union_gbps"], "{:.2f}"),
            _maybe(r["raw_gbps"], "{:.2f}"),
            _maybe(r["efficiency"], "{:.2f}"),
            _maybe(r["all_reduce_efficiency"], "{:.2f}"),
        ]
        for r in rows
    ]
    return markdown_table(headers, body)


def bytes_table(counts: list[dict]) -> str:
    """One line per distinct task set of each config (the paper repeats a 10-client pattern)."""
    groups: dict[tuple, list[dict]] = {}
    for row in counts:
        groups.setdefault((row["config"], tuple(row["tasks"])), []).append(row)
    headers = [
        "config", "clients", "tasks", "trainable", "frozen read", "full upload (fp32)",
        "wire fp64", "wire fp32", "wire bf16", "full / wire: fp64, fp32, bf16",
    ]  # fmt: skip
    body = []
    for (config, tasks), same in groups.items():
        r = same[0]
        body.append(
            [
                f"`{Path(config).name}`",
                ", ".join(str(x["client"]) for x in same),
                "+".join(tasks),
                f"{r['trainable_params'] / 1e6:.2f}M",
                f"{r['frozen_params'] / 1e6:.1f}M",
                f"{r['full_upload_bytes'] / 1e6:.0f} MB",
                *(f"{r['wire_bytes'][d] / 1e6:.1f} MB" for d in DTYPES),
                ", ".join(f"{r['shrink'][d]:.0f}x" for d in DTYPES),
            ]
        )
    return markdown_table(headers, body)


def summarize(counts: list[dict]) -> list[dict]:
    """Per config and wire dtype: total full bytes over total wire bytes of all clients (what a
    round costs when clients are sampled uniformly), and how many clients reach the target."""
    out = []
    for config in dict.fromkeys(r["config"] for r in counts):
        rows = [r for r in counts if r["config"] == config]
        full = sum(r["full_upload_bytes"] for r in rows)
        for d in DTYPES:
            out.append(
                {
                    "config": config,
                    "dtype": d,
                    "clients": len(rows),
                    "shrink_mean_client": full / sum(r["wire_bytes"][d] for r in rows),
                    "shrink_worst_client": min(r["shrink"][d] for r in rows),
                    "clients_at_target": sum(r["shrink"][d] >= TARGET_SHRINK for r in rows),
                }
            )
    return out


def bytes_summary(counts: list[dict]) -> str:
    lines = [
        f"Full upload over wire bytes, all clients together (worst client; clients at "
        f">= {TARGET_SHRINK}x):"
    ]
    for s in summarize(counts):
        lines.append(
            f"- `{s['config']}` {s['dtype']}: {s['shrink_mean_client']:.1f}x "
            f"({s['shrink_worst_client']:.1f}x; {s['clients_at_target']} of {s['clients']})"
        )
    return "\n".join(lines)


def _maybe(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


if __name__ == "__main__":
    sys.exit(run_main(main))
