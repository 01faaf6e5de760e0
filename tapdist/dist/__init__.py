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

__all__ = ["DistContext", "DistError", "Launch", "LaunchError", "detect_launch", "init_context",
           "resolve_device", "SingleProcessContext", "TorchContext", "MpiContext"]

log = logging.getLogger(__name__)


def init_context(cfg: DistConfig, launch: Launch | None = None) -> DistContext:
    """Detect the launch, pick device and backend, and join the other ranks."""
    launch = launch or detect_launch(cfg.launcher)
    device = resolve_device(cfg.device, launch)
    backend = resolve_backend(cfg.backend, device)
    if launch.world_size == 1:
        return SingleProcessContext(device)
    if backend == "mpi":
        return MpiContext(launch, device, cfg.timeout_s)
    addr, port = launch.master_addr, launch.master_port
    if launch.launcher == "mpi" and not (addr and port):
        addr, port = _mpi_address(launch)
    return TorchContext.create(backend, launch, device, init_method=f"tcp://{addr}:{port}",
                               timeout_s=cfg.timeout_s, init_timeout_s=cfg.init_timeout_s)


def resolve_device(choice: str, launch: Launch) -> torch.device:
    """One rank per GPU: local rank i uses cuda:i, or cuda:0 where Slurm bound one GPU to each
    task (``srun --gpus-per-task=1``). Too few GPUs: an error for ``cuda``, the CPU for ``auto``.
    """
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistError("dist.device = cuda but CUDA is not available on "
                        f"rank {launch.rank}; use dist.device=cpu or auto")
    gpus = torch.cuda.device_count()
    if launch.local_world_size <= gpus:
        return torch.device("cuda", launch.local_rank)
    if gpus == 1 and launch.launcher == "slurm":
        return torch.device("cuda", 0)  # each task sees its own GPU
    problem = (f"{launch.local_world_size} ranks on this node but only {gpus} GPU(s), and ranks "
               "cannot share a GPU")
    if choice == "auto":
        log.warning("%s: running on the CPU (set dist.device=cpu to silence this)", problem)
        return torch.device("cpu")
    raise DistError(f"{problem}; start at most {gpus} ranks per node or set dist.device=cpu")


def _mpi_address(launch: Launch) -> tuple[str, int]:
    try:
        return mpi_rendezvous_address(launch)
    except ImportError:
        raise LaunchError("started by mpirun but mpi4py is not installed, so rank 0 cannot share "
                          "its address: pip install 'tapdist[mpi]', or export MASTER_ADDR and "
                          "MASTER_PORT to every rank") from None


def resolve_backend(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise DistError("dist.backend = nccl needs CUDA devices; use dist.backend=gloo or mpi "
                        "on CPU, or dist.device=cuda on a GPU node")
    return choice
