"""Launch detection, devices and the distributed context (the only seam to other processes)."""

from __future__ import annotations

import logging

import torch

from tapdist.config import DistConfig
from tapdist.dist.context import (
    DistContext,
    DistError,
    MpiContext,
    SingleProcessContext,
    TorchContext,
    mpi_rendezvous_address,
)
from tapdist.dist.launch import Launch, LaunchError, detect_launch

__all__ = [
    "DeviceError",
    "DistContext",
    "DistError",
    "Launch",
    "LaunchError",
    "MpiContext",
    "SingleProcessContext",
    "TorchContext",
    "detect_launch",
    "device_for",
    "init_context",
    "resolve_backend",
    "resolve_device",
]

log = logging.getLogger(__name__)


class DeviceError(LaunchError, DistError):
    """The GPUs this rank sees cannot serve the config: no CUDA, or fewer GPUs on the node than
    ranks placed there. A launch problem the user fixes (exit code 2); also a
    :class:`DistError`, as the device is part of joining the other ranks."""


def init_context(cfg: DistConfig, launch: Launch | None = None) -> DistContext:
    """Detect the launch, pick device and backend, and join the other ranks."""
    launch = launch or detect_launch(cfg.launcher)
    device = resolve_device(cfg.device, launch, cfg.backend)
    backend = resolve_backend(cfg.backend, device)
    if launch.world_size == 1:
        return SingleProcessContext(device)
    if backend == "mpi":
        return MpiContext(launch, device, cfg.timeout_s, cfg.init_timeout_s)
    addr, port = launch.master_addr, launch.master_port
    if launch.launcher == "mpi" and not (addr and port):
        addr, port = _mpi_address(launch)
    return TorchContext.create(
        backend,
        launch,
        device,
        init_method=f"tcp://{addr}:{port}",
        timeout_s=cfg.timeout_s,
        init_timeout_s=cfg.init_timeout_s,
    )


def resolve_device(choice: str, launch: Launch, backend: str = "auto") -> torch.device:
    """This rank's device from ``dist.device`` and ``dist.backend`` and the GPUs it sees."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return device_for(launch, gpus, choice, backend)


def device_for(
    launch: Launch, gpus: int, device: str = "auto", backend: str = "auto"
) -> torch.device:
    """The device of the rank ``launch`` describes when its process sees ``gpus`` GPUs.

    One rank per GPU: local rank i uses cuda:i, or cuda:0 where Slurm bound one GPU to each task
    (``srun --gpus-per-task=1``: each task sees one GPU, and the step holds as many on the node
    as it has tasks there). ``dist.device=cuda`` or ``dist.backend=nccl`` demand a GPU per
    rank (NCCL cannot put two ranks on one GPU) and raise :class:`DeviceError` otherwise;
    ``auto`` falls back to the CPU. A pure function of its arguments, so every case can be
    checked without GPUs.
    """
    demand = _cuda_demand(device, backend)
    if device == "cpu":
        if demand:
            raise DeviceError(
                f"{demand} needs CUDA devices but dist.device = cpu; use dist.backend=gloo "
                "(or mpi) on the CPU, or dist.device=cuda on a GPU node"
            )
        return torch.device("cpu")
    if gpus == 0:
        if demand:
            raise DeviceError(
                f"{demand} but rank {launch.rank} sees no CUDA device; use dist.device=cpu "
                "with dist.backend=gloo or mpi, or run on a GPU node (check the driver with "
                "nvidia-smi, and CUDA_VISIBLE_DEVICES)"
            )
        return torch.device("cpu")
    if launch.local_world_size <= gpus:
        return torch.device("cuda", launch.local_rank)
    own = launch.node_gpus == 0 or launch.node_gpus >= launch.local_world_size
    if gpus == 1 and launch.launcher == "slurm" and own:
        return torch.device("cuda", 0)  # each task sees its own GPU
    problem = (
        f"{launch.local_world_size} ranks on this node but only {gpus} GPU(s), and ranks "
        "cannot share a GPU"
    )
    if not demand:
        log.warning("%s: running on the CPU (set dist.device=cpu to silence this)", problem)
        return torch.device("cpu")
    raise DeviceError(
        f"{demand}: {problem}; start at most {gpus} ranks per node (torchrun "
        f"--nproc_per_node={gpus}, srun --ntasks-per-node={gpus}) or set dist.device=cpu"
    )


def _cuda_demand(device: str, backend: str) -> str:
    """The setting that demands CUDA, as the user wrote it, or '' where none does."""
    if device == "cuda":
        return "dist.device = cuda"
    if backend == "nccl":
        return "dist.backend = nccl"
    return ""


def _mpi_address(launch: Launch) -> tuple[str, int]:
    try:
        return mpi_rendezvous_address(launch)
    except ImportError:
        raise LaunchError(
            "started by mpirun but mpi4py is not installed, so rank 0 cannot share "
            "its address: pip install 'tapdist[mpi]', or export MASTER_ADDR and "
            "MASTER_PORT to every rank"
        ) from None


def resolve_backend(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise DeviceError(
            "dist.backend = nccl needs CUDA devices; use dist.backend=gloo or mpi "
            "on CPU, or dist.device=cuda on a GPU node"
        )
    return choice
