"""Recognise how this process was launched: torchrun, srun, mpirun, or plainly.

Each launcher describes the job through environment variables; :func:`detect_launch` reads them
into one :class:`Launch` record. Nothing here starts a process group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LAUNCHERS = ("single", "torchrun", "slurm", "mpi")


class LaunchError(RuntimeError):
    """The launch environment is incomplete or contradicts the configuration."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job."""

    launcher: str  # one of LAUNCHERS
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str = ""  # empty: decided at rendezvous (mpi4py broadcast) or not needed
    master_port: int = 0
    node_gpus: int = 0  # GPUs the launcher gave this node's tasks together; 0: not known
    # (or one per task): under Slurm, tasks that see one GPU share it when this is below their
    # number on the node

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(
                f"{self.launcher}: rank {self.rank} is outside world size "
                f"{self.world_size}; check the launcher's environment"
            )
        if not 0 <= self.local_rank < self.local_world_size:
            raise LaunchError(
                f"{self.launcher}: local rank {self.local_rank} is outside local "
                f"world size {self.local_world_size}"
            )


def detect_launch(launcher: str = "auto", env: Mapping[str, str] | None = None) -> Launch:
    """Read the launch environment. ``launcher`` forces one kind; ``auto`` picks the first found.

    Order: torchrun, then an srun step, then MPI (MPICH's PMI_* or Open MPI's OMPI_COMM_WORLD_*),
    then a single process. Under ``srun --mpi=pmi2`` both Slurm and PMI variables are set and
    agree; Slurm's are used since they need no mpi4py.
    """
    env = os.environ if env is None else env
    readers = {"torchrun": _torchrun, "slurm": _slurm, "mpi": _mpi, "single": _single}
    if launcher != "auto":
        if launcher not in readers:
            raise LaunchError(
                f"unknown launcher '{launcher}'; accepted: auto, " + ", ".join(LAUNCHERS)
            )
        found = readers[launcher](env)
        if found is None:
            raise LaunchError(
                f"dist.launcher = {launcher} but this process has no {launcher} "
                f"environment ({_expected[launcher]}); start it with that "
                f"launcher or set dist.launcher=auto"
            )
        return found
    torchrun, slurm, mpi = _torchrun(env), _slurm(env), _mpi(env)
    if torchrun is not None:
        return torchrun
    if (
        slurm is not None
        and mpi is not None
        and (slurm.rank, slurm.world_size) != (mpi.rank, mpi.world_size)
    ):
        # mpirun inside an allocation starts its proxies with srun: the Slurm variables then
        # describe the proxies, the MPI ones the ranks.
        return mpi
    return slurm or mpi or _single(env)


_expected = {
    "torchrun": "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT",
    "slurm": "SLURM_PROCID, SLURM_NTASKS and SLURM_STEP_ID, as srun sets them",
    "mpi": "PMI_RANK/PMI_SIZE or OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE",
    "single": "none",
}


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _torchrun(env: Mapping[str, str]) -> Launch | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise LaunchError(
            f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not; "
            "launch with torchrun, or export MASTER_ADDR and MASTER_PORT"
        )
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local, local_world = _local(env, rank, world, "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return Launch(
        "torchrun", rank, world, local, local_world, env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    )


def _local(
    env: Mapping[str, str], rank: int, world: int, local_key: str, local_size_key: str
) -> tuple[int, int]:
    """This process's place on its node: from the launcher's own variables, else from srun's
    where srun started the process (`srun --mpi=pmi2` sets no MPI local rank), else as if every
    rank ran on this node (ranks started by hand with RANK and WORLD_SIZE)."""
    if local_key in env:
        local_world = _int(env, local_size_key) if local_size_key in env else world
        return _int(env, local_key), local_world
    if "SLURM_LOCALID" in env and _in_srun_step(env):
        return _int(env, "SLURM_LOCALID"), _slurm_local_tasks(env, world)
    return rank, world


def _in_srun_step(env: Mapping[str, str]) -> bool:
    """Whether srun started this process. A batch script also sees SLURM_PROCID and
    SLURM_NTASKS, but only an srun step has a numbered SLURM_STEP_ID (Slurm's own steps are
    named batch, extern and interactive)."""
    return env.get("SLURM_STEP_ID", "batch") not in ("batch", "extern", "interactive")


def _slurm(env: Mapping[str, str]) -> Launch | None:
    # without srun, `python -m tapdist` in an sbatch script runs as one process
    if "SLURM_PROCID" not in env or not _in_srun_step(env):
        return None
    ntasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world = _int(env, ntasks)
    rank = _int(env, "SLURM_PROCID")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    local_world = _slurm_local_tasks(env, world)
    addr = env.get("MASTER_ADDR") or _first_host(env)
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(env)
    return Launch("slurm", rank, world, local_rank, local_world, addr, port, _node_gpus(env))


def _node_gpus(env: Mapping[str, str]) -> int:
    """The GPUs Slurm gave this node's tasks together, as far as its variables tell: the longer
    of the step's and the job's GPU lists (a task bound to its own GPU may list only that one);
    0 where they say nothing, or where GPUs were asked per task (--gpus-per-task)."""
    if env.get("SLURM_GPUS_PER_TASK"):
        return 0
    lists = (env.get(name, "") for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"))
    return max(len([g for g in gpus.split(",") if g.strip()]) for gpus in lists)


def _slurm_local_tasks(env: Mapping[str, str], world: int) -> int:
    # SLURM_TASKS_PER_NODE looks like "2(x3),1"; this node's count is what matters and Slurm
    # gives it directly in SLURM_STEP_TASKS_PER_NODE only for homogeneous steps.
    node = env.get("SLURM_NODEID", "0")
    counts = _expand_counts(
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    )
    index = int(node) if node.isdigit() else 0
    return counts[index] if index < len(counts) else counts[-1]


def _expand_counts(spec: str) -> list[int]:
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


# Derived rendezvous ports stay in [20000, 32768): Linux hands out ephemeral ports (the local
# end of outgoing connections) from 32768 up, and one of those could already hold a port above.
# slurm/multi_node_torchrun.sbatch derives its c10d port within the same range.
PORT_BASE, PORT_SPAN = 20000, 12768


def slurm_port(env: Mapping[str, str]) -> int:
    """A rendezvous port every task of one step derives alike, from the job and step ids, so
    steps running side by side in one allocation do not meet at the same port."""
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    step = env.get("SLURM_STEP_ID", "0")
    if not job.isdigit():
        return 29500
    return PORT_BASE + (int(job) * 97 + (int(step) if step.isdigit() else 0)) % PORT_SPAN


def _first_host(env: Mapping[str, str]) -> str:
    # The step's nodes: a step may run on part of the allocation.
    nodelist = (
        env.get("SLURM_STEP_NODELIST")
        or env.get("SLURM_JOB_NODELIST")
        or env.get("SLURM_NODELIST")
        or ""
    )
    if not nodelist:
        return "127.0.0.1"
    if not any(c in nodelist for c in "[],"):
        return nodelist
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise LaunchError(
            f"cannot expand the Slurm node list {nodelist!r} with "
            f"`scontrol show hostnames` ({err}); export MASTER_ADDR to the "
            "first node's address"
        ) from None
    return out.split()[0]


def _mpi(env: Mapping[str, str]) -> Launch | None:
    for rank_key, size_key, local_key, local_size_key in (
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
    ):
        if rank_key in env and size_key in env:
            rank, world = _int(env, rank_key), _int(env, size_key)
            local, local_world = _local(env, rank, world, local_key, local_size_key)
            return Launch(
                "mpi",
                rank,
                world,
                local,
                local_world,
                env.get("MASTER_ADDR", ""),
                _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 0,
            )
    return None


def _single(env: Mapping[str, str]) -> Launch:
    return Launch("single", 0, 1, 0, 1)


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def local_torchrun_command(
    processes: int, args: Sequence[str], module: str = "tapdist", flags: Sequence[str] = ()
) -> list[str]:
    """The command that starts ``python -m MODULE ARGS`` as ``processes`` local ranks under
    torchrun (standalone rendezvous on this host; ``flags`` go to torchrun)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        *flags,
        "-m",
        module,
        *args,
    ]


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often the launcher has restarted this job: torchrun's elastic restarts
    (``TORCHELASTIC_RESTART_COUNT``) or a requeued Slurm job (``SLURM_RESTART_COUNT``)."""
    env = os.environ if env is None else env
    counts = (env.get("TORCHELASTIC_RESTART_COUNT", "0"), env.get("SLURM_RESTART_COUNT", "0"))
    return max(int(c) if c.isdigit() else 0 for c in counts)
