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
    if launch.launcher == "mpi":
        addr, port = mpi_rendezvous_address(launch)
    return TorchContext.create(backend, launch, device, init_method=f"tcp://{addr}:{port}",
                               timeout_s=cfg.timeout_s, init_timeout_s=cfg.init_timeout_s)


def resolve_device(choice: str, launch: Launch) -> torch.device:
    """One rank per GPU: local rank i uses cuda:i. Fails when a node has too few GPUs."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistError("dist.device = cuda but CUDA is not available on "
                        f"rank {launch.rank}; use dist.device=cpu or auto")
    gpus = torch.cuda.device_count()
    if launch.local_world_size > gpus:
        raise DistError(f"{launch.local_world_size} ranks on this node but only {gpus} GPU(s): "
                        "one rank per GPU is required (NCCL cannot share a GPU between ranks); "
                        f"start at most {gpus} ranks per node or set dist.device=cpu")
    return torch.device("cuda", launch.local_rank)


def resolve_backend(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise DistError("dist.backend = nccl needs CUDA devices; use dist.backend=gloo or mpi "
                        "on CPU, or dist.device=cuda on a GPU node")
    return choice
