"""Client-round throughput: one client's TAP round on one device.

A TAP client-round trains the client's copy of the global model, scores it against the personal
model on the round's comparison micro-batches (the replacement test), and trains the personal
model: ``2 x local_steps x accumulation`` training micro-batches plus the comparison. This script
times that round through tapdist's own code (the resident model, the round's plan, the trainer),
and next to it the bare loop of the same model (forward and backward of ready micro-batches, no
optimizer), counts the FLOPs of one micro-batch, and reports the model FLOP utilisation against
the device's peak, samples per second and peak memory.

    python -m benchmarks.round                                   # paper FLAVA and ViLT, GPU
    python -m benchmarks.round --tiny --steps 4                  # tiny models on CPU
    python -m benchmarks.round --config configs/paper_vilt.yaml --amp bf16 off
    python -m benchmarks.round --count --device cpu --amp bf16   # what a micro-batch dispatches

The defaults are the paper settings' clients with an image task and AG News classification
(FLAVA client 7: CIFAR-100 + AG News, 80 + 80 micro-batches of 32; ViLT client 7: Fashion-MNIST
reconstruction + AG News, 120 + 120), synthetic data of the real shapes, random init.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    RESULTS,
    BenchmarkError,
    config_path,
    describe,
    hardware,
    memory_now,
    run_main,
    write_json,
)
from tapdist.config import load_config
from tapdist.local import LocalTrainer, plan
from tapdist.models.federated import TapFederation
from tapdist.registry import ALGORITHMS, load_builtins

CONFIGS = ("configs/paper_flava.yaml", "configs/paper_vilt.yaml")
#: dense peak FLOP/s per (device name fragment, dtype); first match wins; a device without an
#: entry (or with an empty one) reports no MFU rather than a borrowed peak
PEAKS = (
    ("H200", {"bf16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {}),  # its own clocks and SM count: not the SXM part's peak
    ("H100", {"bf16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
)
#: a tiny configuration of each paper model, for CPU runs and tests
TINY = ["model.size=tiny", "model.layers_per_block=1", "data.text_len=32"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda, but torch sees no CUDA device; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json is None:
        args.json = RESULTS / ("count.json" if args.count else "round.json")
    load_builtins()
    results = []
    for config in args.config or CONFIGS:
        overrides = [*(TINY if args.tiny else []), *args.overrides]
        if args.steps:
            overrides += [f"train.local_steps={args.steps}", "train.accumulation=1"]
        cfg = load_config(config_path(config), overrides)
        started = time.perf_counter()
        federation = TapFederation(cfg, device)
        build_s = _since(started, device)
        for amp in args.amp:
            if args.count:
                results.append({"config": str(config), **counted(federation, cfg, args, amp)})
                print(json.dumps(results[-1]), flush=True)
                write_json(args.json, {"hardware": hardware(), "results": results})
                continue
            for graphs in args.graphs:
                print(
                    f"== {config}: client {args.client}, amp {amp}, {device}, cuda graphs {graphs}",
                    flush=True,
                )
                result = measure(federation, cfg, args.client, amp, graphs, device, args)
                results.append({"config": str(config), "build_s": build_s, **result})
                print(json.dumps(results[-1], indent=1), flush=True)
                # after every case: a run cut short keeps what it measured
                write_json(args.json, {"hardware": hardware(), "results": results})
    print()
    print(f"{describe(hardware())}\n")
    print(count_table(results) if args.count else table(results))
    if not args.count and any(r["peak_memory_of"] != "CUDA allocated" for r in results):
        print("\npeak GiB on the CPU: the process's peak resident memory, every case so far")
    if args.count:
        for result in results:
            print(f"\n{operator_table(result)}")
    print(f"\nwrote {args.json}")
    return 0


def measure(
    federation, cfg, client: int, amp: str, graphs: str, device: torch.device, args
) -> dict:
    """Time ``args.repeats`` TAP client-rounds of ``client`` after ``args.warmup`` untimed ones
    (which capture the CUDA graphs, if any), the bare loop, and one micro-batch's FLOPs."""
    train = dataclasses.replace(cfg.train, amp=amp, cuda_graphs=graphs)
    federation.trainer = LocalTrainer(federation.model, train, device)
    algorithm = ALGORITHMS.get("tap")(dataclasses.replace(cfg, train=train), federation)
    tasks = list(federation.specs[client].tasks)
    start = federation.initial_substate(client)
    micro_batches = train.local_steps * train.accumulation
    _reset_peak(device)

    rounds, phases = [], []
    for i in range(args.warmup + args.repeats):
        generator = torch.Generator().manual_seed(i)
        began = time.perf_counter()
        update = algorithm.client_round(client, start, cfg.train.warmup_rounds, generator)
        seconds = _since(began, device)
        if i >= args.warmup:
            rounds.append(seconds)
            phases.append({k: update.metrics[k] for k in ("global_s", "replace_s", "personal_s")})
    round_s = statistics.median(rounds)
    train_ms = 1e3 * statistics.median(p["global_s"] + p["personal_s"] for p in phases)
    train_ms /= 2 * micro_batches

    flops = micro_batch_flops(federation, client, start, device)
    ops = count_operators(federation, client, start, device)
    bare_ms, syncs, sync_sites = bare_loop(federation, client, start, device, args.bare)
    captured = federation.trainer.graphs
    profiled = profile(federation, client, start, device) if args.profile else None
    peak = _peak(device, "bf16" if federation.trainer.autocast else "fp32")
    samples = 2 * micro_batches * train.batch_size
    return {
        "client": client,
        "tasks": tasks,
        "device": _device_name(device),
        "amp": "bf16" if federation.trainer.autocast else "fp32",
        "cuda_graphs": None if captured is None else captured.captures,
        "graph_replays": None if captured is None else captured.replays,
        "micro_batches": 2 * micro_batches,
        "batch_size": train.batch_size,
        "round_s": round_s,
        "rounds_s": rounds,
        "phases_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "micro_batch_ms": train_ms,
        "bare_micro_batch_ms": bare_ms,
        "samples_per_s": samples / round_s,
        "tflop_per_micro_batch": flops / 1e12,
        "operators_per_micro_batch": ops,
        "tflops": flops / (train_ms / 1e3) / 1e12,
        "mfu": None if peak is None else flops / (train_ms / 1e3) / peak,
        "bare_mfu": None if peak is None else flops / (bare_ms / 1e3) / peak,
        "host_syncs_per_micro_batch": syncs,
        "host_sync_sites": sync_sites,
        "peak_memory_gib": _peak_memory(device) / 2**30,
        "peak_memory_of": "CUDA allocated" if device.type == "cuda" else "process peak RSS",
        "profile": profiled,
        "trainable_params": sum(v.numel() for v in start.values()),
    }


def micro_batch_flops(federation, client: int, state, device: torch.device) -> float:
    """FLOPs of one training micro-batch (forward and backward), counted by PyTorch."""
    trainer, data = federation.trainer, federation.train_data(client)
    batches = plan(data, 1, federation.cfg.train.batch_size, torch.Generator().manual_seed(0))
    data, batches = trainer._on_device(data, batches)
    federation.model.load_state(state, list(state))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = trainer._micro_batch(data, batches, 0, None, None)
        loss.backward()
    federation.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


#: operators that do a micro-batch's arithmetic; everything else moves memory
_MATMULS = {
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "convolution",
    "convolution_backward",
    *(
        f"_scaled_dot_product_{kind}_attention{side}"
        for kind in ("flash", "efficient", "cudnn")
        for side in ("", "_backward")
    ),
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
}


#: operators that only allocate: they launch no kernel and write nothing
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def _kind(name: str) -> str:
    """What an operator that is not a view does: a matmul, an allocation or memory-bound work."""
    if name in _MATMULS:
        return "matmul"
    return "allocation" if name in _ALLOCATIONS else "memory-bound"


class _OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched, how many of them are views (no kernel), the casts
    between floating dtypes among them (autocast's, and their backward), and per operator that
    is not a view its calls and the bytes its outputs hold."""

    def __init__(self):
        super().__init__()
        self.total = self.views = self.casts = 0
        self.calls: Counter[str] = Counter()
        self.written: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.total += 1
        self.views += func.is_view
        if func.is_view:
            return out
        name = func.overloadpacket.__name__
        if name == "_to_copy":
            to = kwargs.get("dtype")
            self.casts += args[0].is_floating_point() and to is not None and to != args[0].dtype
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.calls[name] += 1
        self.written[name] += sum(t.numel() * t.element_size() for t in outputs)
        return out


def count_operators(federation, client: int, state, device: torch.device) -> dict:
    """aten operators of one forward + backward micro-batch: what the host dispatches (each
    one that is neither a view nor an allocation launches at least one kernel on a GPU), and
    the bytes written by the memory-bound ones (an allocation writes nothing). The count
    depends on the model's structure, not its widths or the device."""
    ready, step = _ready_steps(federation, client, state, 1)
    counter = _OperatorCount()
    with counter:
        step(ready[0])
    federation.model.zero_grad(set_to_none=True)
    by_operator = {  # the operators that are not views, the largest outputs first
        name: {
            "calls": counter.calls[name],
            "mib_written": written / 2**20,  # an allocation's: allocated, not written
            "kind": _kind(name),
        }
        for name, written in sorted(counter.written.items(), key=lambda kv: -kv[1])
    }
    return {
        "total": counter.total,
        "views": counter.views,
        "allocations": sum(
            op["calls"] for op in by_operator.values() if op["kind"] == "allocation"
        ),
        "casts": counter.casts,
        "memory_bound_mib_written": sum(
            op["mib_written"] for op in by_operator.values() if op["kind"] == "memory-bound"
        ),
        "by_operator": by_operator,
    }


def counted(federation, cfg, args, amp: str) -> dict:
    """FLOPs and operators of one training micro-batch, nothing timed (``--count``): what the
    host dispatches does not depend on the device, so a CPU counts it for a GPU."""
    device = federation.device
    train = dataclasses.replace(cfg.train, amp=amp, cuda_graphs="off")
    federation.trainer = LocalTrainer(federation.model, train, device)
    start = federation.initial_substate(args.client)
    return {
        "client": args.client,
        "tasks": list(federation.specs[args.client].tasks),
        "amp": "bf16" if federation.trainer.autocast else "fp32",
        "batch_size": train.batch_size,
        "tflop_per_micro_batch": micro_batch_flops(federation, args.client, start, device) / 1e12,
        "operators_per_micro_batch": count_operators(federation, args.client, start, device),
    }


def count_table(results: list[dict]) -> str:
    head = (
        "| config | client | amp | batch | GFLOP/mb | operators | views | allocations "
        "| kernel operators | casts | memory-bound MiB written |"
    )
    rows = [head, _rule(head)]
    for r in results:
        ops = r["operators_per_micro_batch"]
        kernels = ops["total"] - ops["views"] - ops["allocations"]
        rows.append(
            f"| {Path(r['config']).stem} | {r['client']} ({'+'.join(r['tasks'])}) | {r['amp']} "
            f"| {r['batch_size']} | {1e3 * r['tflop_per_micro_batch']:.1f} | {ops['total']} "
            f"| {ops['views']} | {ops['allocations']} | {kernels} | {ops['casts']} "
            f"| {ops['memory_bound_mib_written']:.0f} |"
        )
    return "\n".join(rows)


def operator_table(result: dict, top: int = 12) -> str:
    """The memory-bound operators of one ``--count`` result that write the most bytes."""
    head = "| operator | calls | MiB written |"
    rows = [f"{Path(result['config']).stem}, {result['amp']}:", head, _rule(head)]
    ops = result["operators_per_micro_batch"]["by_operator"]
    bound = [(name, op) for name, op in ops.items() if op["kind"] == "memory-bound"][:top]
    rows += [f"| `{name}` | {op['calls']} | {op['mib_written']:.0f} |" for name, op in bound]
    return "\n".join(rows)


def bare_loop(federation, client: int, state, device: torch.device, count: int):
    """Milliseconds per micro-batch of forward + backward on ready micro-batches (no optimizer,
    no plan, no graphs), and on CUDA the host synchronisations one training micro-batch makes
    and where (file:line of the Python code that made each)."""
    ready, step = _ready_steps(federation, client, state, count)
    step(ready[0])  # allocator and kernel caches warm
    began = time.perf_counter()
    for micro in ready:
        step(micro)
    ms = 1e3 * _since(began, device) / count
    syncs = sites = None
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(ready[0])
            finally:
                torch.cuda.set_sync_debug_mode(0)
        made = [w for w in caught if "synchroniz" in str(w.message)]
        syncs, sites = len(made), [f"{_short(w.filename)}:{w.lineno}" for w in made]
    federation.model.zero_grad(set_to_none=True)
    return ms, syncs, sites


def profile(federation, client: int, state, device: torch.device, count: int = 4) -> dict:
    """Where a micro-batch's time goes: kernel launches, device-busy time against wall time,
    and the top operators (printed)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ready, step = _ready_steps(federation, client, state, count)
    step(ready[0])
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    began = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for micro in ready:
            step(micro)
        _since(began, device)
    wall_ms = 1e3 * (time.perf_counter() - began) / count
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=20), flush=True)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
    # each kernel's time shows twice, on its own row and in its operator's: count the operators
    host_rows = [e for e in events if e.device_type == DeviceType.CPU]
    busy = sum(e.self_device_time_total for e in host_rows) / 1e3  # us -> ms
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    federation.model.zero_grad(set_to_none=True)
    return {
        "wall_ms": wall_ms,
        "device_busy_ms": busy / count,
        "kernel_launches": launches / count,
        "aten_ops": ops / count,
    }


def _ready_steps(federation, client: int, state, count: int):
    """``count`` micro-batches already on the device, and a forward + backward of one."""
    trainer, data = federation.trainer, federation.train_data(client)
    batches = plan(data, count, federation.cfg.train.batch_size, torch.Generator().manual_seed(1))
    data, batches = trainer._on_device(data, batches)
    federation.model.load_state(state, list(state))
    federation.model.train()
    ready = [trainer._inputs(data, batches, i) for i in range(count)]
    model = federation.model

    def step(micro):
        with trainer.computing():
            with trainer._precision():
                total = sum(
                    batches.shares[t] * model.heads[t].loss(model(t, b)[0], b).float()
                    for t, b in micro.items()
                )
            total.backward()

    return ready, step


def table(results: list[dict]) -> str:
    head = (
        "| config | client | amp | graphs | micro-batches | round s | phases g/r/p s "
        "| micro-batch ms | bare ms | samples/s | GFLOP/mb | ops/mb (views, casts) | TFLOP/s | MFU "
        "| bare MFU | syncs/mb | peak GiB |"
    )
    rows = [head, _rule(head)]
    for r in results:
        p, ops = r["phases_s"], r["operators_per_micro_batch"]
        rows.append(
            f"| {Path(r['config']).stem} | {r['client']} ({'+'.join(r['tasks'])}) | {r['amp']} "
            f"| {'-' if r.get('cuda_graphs') is None else r['cuda_graphs']} "
            f"| {r['micro_batches']}x{r['batch_size']} | {r['round_s']:.2f} "
            f"| {p['global_s']:.2f}/{p['replace_s']:.2f}/{p['personal_s']:.2f} "
            f"| {r['micro_batch_ms']:.1f} | {r['bare_micro_batch_ms']:.1f} "
            f"| {r['samples_per_s']:.0f} | {1e3 * r['tflop_per_micro_batch']:.1f} "
            f"| {ops['total']} ({ops['views']}, {ops.get('casts', '-')}) "
            f"| {r['tflops']:.2f} "
            f"| {_pct(r['mfu'])} | {_pct(r['bare_mfu'])} "
            f"| {_or_dash(r['host_syncs_per_micro_batch'])} "
            f"| {r['peak_memory_gib']:.1f} |"
        )
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks.round", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", help="config file (repeatable; default: paper)")
    p.add_argument("--client", type=int, default=7, help="client index (default 7)")
    p.add_argument("--amp", nargs="+", default=["auto"], choices=("auto", "bf16", "off"))
    p.add_argument(
        "--graphs",
        nargs="+",
        default=["auto"],
        choices=("auto", "off"),
        help="train.cuda_graphs settings to compare (default auto: on CUDA)",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="tiny backbone (CPU, tests)")
    p.add_argument("--steps", type=int, default=0, help="override local_steps (accumulation 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed client-rounds first")
    p.add_argument("--repeats", type=int, default=2, help="timed client-rounds (median)")
    p.add_argument("--bare", type=int, default=20, help="micro-batches of the bare loop")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override (repeatable); repetitions are --warmup/--repeats, not bench.*",
    )
    p.add_argument(
        "--threads", type=int, help="intra-op threads (default: torch's, every usable core)"
    )
    p.add_argument("--profile", action="store_true", help="profile a few micro-batches")
    p.add_argument(
        "--count",
        action="store_true",
        help="only count one micro-batch's FLOPs and operators (no timing; any device)",
    )
    p.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default benchmarks/results/round.json; with --count, "
        "count.json)",
    )
    return p


def _since(began: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int:
    usage = memory_now(device)
    return usage.get("cuda_peak_allocated", usage["peak_rss"])


def _peak(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(dtype) for key, peaks in PEAKS if key in name), None)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()}"


def _short(filename: str) -> str:
    return "/".join(Path(filename).parts[-3:])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _or_dash(x) -> str:
    return "-" if x is None else str(x)


def _rule(head: str) -> str:
    return "|" + " --- |" * (head.count("|") - 1)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
