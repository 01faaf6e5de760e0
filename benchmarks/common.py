"""What the benchmark scripts share: hardware description, timing, tables, JSON, starting ranks.

A benchmark is a module run as ``python -m benchmarks.NAME`` from the repository root (or
``tapdist bench NAME``). One that needs several ranks is its own launcher: run plainly, it starts
itself once per world size (torchrun, mpiexec or srun) with ``--worker`` and reads the rows rank 0
wrote; started by a launcher itself, every rank measures that world size and rank 0 reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LAUNCHERS = ("torchrun", "mpiexec", "srun")


class BenchmarkError(RuntimeError):
    """A benchmark could not run as asked; the message says what to change."""


def run_main(main: Callable[[], int]) -> int:
    """``main()`` as a script's exit status: bad input (a config, the launch) and a failed
    benchmark end with their one-line message instead of a traceback."""
    from tapdist.errors import USER_ERRORS, exit_code, report

    try:
        return main()
    except BenchmarkError as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        report(err)
        return exit_code(err)


# --- facts and numbers ----------------------------------------------------------------------------


def hardware() -> dict[str, Any]:
    """Where the numbers come from: host, CPUs, memory, GPUs and library versions."""
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def describe(hw: dict[str, Any]) -> str:
    """One line for a table's caption, e.g. '2 CPUs (Intel Xeon ...), 23.4 GiB, no GPU'."""
    gpus = ", ".join(hw["gpus"]) if hw["gpus"] else "no GPU"
    memory = f"{hw['memory_gib']:.1f} GiB" if hw["memory_gib"] else "memory unknown"
    return (
        f"{hw['host']}: {hw['cpus_usable'] or hw['cpus']} CPUs ({hw['cpu']}), {memory}, {gpus}; "
        f"torch {hw['torch']}"
    )


def timed(
    fn: Callable[[], object],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before each clock reading."""
    seconds = []
    for i in range(warmup + repeats):
        if sync is not None:
            sync()
        started = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; numbers are printed as given (format them first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: object) -> Path:
    """Write ``payload`` as indented JSON, atomically, creating the folder; returns the path."""
    from tapdist.checkpoint import write_text

    target = Path(path)
    write_text(target, json.dumps(payload, indent=2) + "\n")
    return target


def memory_now(device: torch.device | None = None) -> dict[str, int]:
    """Resident memory of this process now and at its peak, and on CUDA the bytes allocated
    by torch now and at their peak (bytes)."""
    out = {"rss": _rss_bytes(), "peak_rss": _peak_rss_bytes()}
    if device is not None and device.type == "cuda":
        out["cuda_allocated"] = torch.cuda.memory_allocated(device)
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device)
    return out


# --- command line and ranks -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every benchmark takes: --json, --set, --threads, --launcher (and the
    hidden --worker/--rows-out its own ranks get)."""
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS / f"{name}.json",
        help=f"where to write the results (default benchmarks/results/{name}.json)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override, e.g. bench.repeats=20 or dist.device=cuda (repeatable)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per rank (OMP_NUM_THREADS and torch.set_num_threads; default 1)",
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="torchrun",
        help="how to start several ranks on this machine or allocation (default torchrun; "
        "srun inside a Slurm allocation)",
    )
    parser.add_argument(
        "--launcher-args",
        default="",
        help="extra options for the launcher, one string, e.g. '--gpus-per-task=1'",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)


def config_path(path: str) -> str:
    """A config file as an absolute path: as given from the working directory, else from the
    repository root (so ``configs/smoke.yaml`` works from anywhere)."""
    given = Path(path)
    if not given.exists() and not given.is_absolute() and (ROOT / given).exists():
        given = ROOT / given
    return str(given.resolve())


def shown(path: str) -> str:
    """A path as tables show it: relative to the repository root where it lies inside."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def launched() -> bool:
    """Whether a launcher started this process as one of several ranks."""
    from tapdist.dist import detect_launch

    return detect_launch().world_size > 1


def set_threads(threads: int) -> None:
    """Intra-op threads of this rank: OMP_NUM_THREADS where a launcher set it, else ``threads``."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", threads)))


def rank_command(
    launcher: str, processes: int, module: str, args: Sequence[str], launcher_args: str = ""
) -> list[str]:
    """The command that runs ``python -m MODULE ARGS`` as ``processes`` ranks: one plain process
    for one rank, else under ``launcher`` (torchrun: local ranks, standalone rendezvous)."""
    from tapdist.dist.launch import local_torchrun_command

    python = [sys.executable, "-m", module, *args]
    extra = shlex.split(launcher_args)
    if processes == 1 and launcher == "torchrun":
        return python
    if launcher == "torchrun":
        return local_torchrun_command(processes, args, module, extra)
    if launcher == "mpiexec":
        mpiexec = _tool("mpiexec", "pip install 'tapdist[mpi-wheel]'")
        return [mpiexec, "-n", str(processes), *extra, *python]
    if launcher == "srun":
        srun = _tool("srun", "run inside a Slurm allocation (salloc or sbatch)")
        return [srun, "-n", str(processes), "--kill-on-bad-exit=1", *extra, *python]
    raise BenchmarkError(f"unknown launcher '{launcher}'; accepted: {', '.join(LAUNCHERS)}")


def run_ranks(command: list[str], threads: int, timeout_s: float = 3600) -> list[dict]:
    """Run ``command`` (from :func:`rank_command`) with ``--rows-out FILE`` appended and return
    the rows rank 0 wrote there."""
    with tempfile.TemporaryDirectory(prefix="tapdist-bench-") as folder:
        rows_out = Path(folder) / "rows.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("HF_HUB_OFFLINE", "1")
        full = [*command, "--rows-out", str(rows_out)]
        try:
            done = subprocess.run(
                full, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"{shlex.join(full)} ran past {timeout_s:.0f}s") from None
        if done.returncode != 0 or not rows_out.exists():
            log = (done.stdout + done.stderr)[-4000:]
            raise BenchmarkError(f"{shlex.join(full)} failed (exit {done.returncode}):\n{log}")
        return json.loads(rows_out.read_text())


def save_rows(path: Path | None, rows: list[dict] | None) -> None:
    """What a worker's rank 0 hands back to the process that started the ranks (the other
    ranks have no rows and write nothing)."""
    if path is not None and rows is not None:
        write_json(path, rows)


# --- the federation a benchmark runs --------------------------------------------------------------


def identical_clients(
    args: argparse.Namespace, clients: int, per_round: int, extra: Sequence[str] = ()
):
    """``args.config`` with ``clients`` identical clients (``args.tasks``, ``args.samples`` each,
    ``args.local_steps``), ``per_round`` of them sampled per round, no baselines; ``extra``
    overrides go before the user's ``--set`` ones."""
    from tapdist.config import load_config

    spec = [{"tasks": list(args.tasks), "samples": args.samples}] * clients
    return load_config(
        args.config,
        [
            f"federation.clients={clients}",
            f"federation.clients_per_round={per_round}",
            "federation.baselines=[]",
            f"data.clients={json.dumps(spec)}",
            f"train.local_steps={args.local_steps}",
            *extra,
            *args.overrides,
        ],
    )


def build_federation(cfg, ctx):
    """The registered model, the algorithm and the topology a training run would build
    (``tapdist.train``), for benchmarks that drive :class:`~tapdist.fl.loop.RoundLoop`."""
    from tapdist.fl.topology import Topology
    from tapdist.registry import ALGORITHMS, MODELS, load_builtins

    load_builtins()
    model = MODELS.get(cfg.model.name)(cfg, ctx.device)
    algorithm = ALGORITHMS.get(cfg.federation.algorithm)(cfg, model)
    sizes = tuple(c.num_samples for c in model.clients())
    topology = Topology(
        ctx.world_size,
        sizes,
        cfg.dist.server_hosts_clients,
        cfg.dist.placement,
        cfg.dist.allow_idle_ranks,
    )
    return model, algorithm, topology


def meta_union_model(cfg):
    """The union TAP model of ``cfg`` on the meta device: every shape and name, no memory and
    no initialisation, so FLAVA or ViLT at full size takes seconds to count."""
    from tapdist.models.federated import build_union_model

    with torch.device("meta"):
        return build_union_model(cfg, device="meta")


# --- internals ------------------------------------------------------------------------------------


def _tool(name: str, fix: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise BenchmarkError(f"{name} not found beside {sys.executable} or on PATH: {fix}")
    return found


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
