"""The distributed context: the one place where processes talk to each other.

Everything tapdist exchanges goes through a :class:`DistContext`: ``all_reduce`` (sum, in place),
``broadcast`` and ``barrier``. Three implementations:

- :class:`SingleProcessContext`: one process; collectives are no-ops.
- :class:`TorchContext`: ``torch.distributed`` with NCCL (one rank per GPU) or gloo (CPU).
- :class:`MpiContext`: MPI through mpi4py, ``Allreduce`` on host buffers.

No other module calls ``torch.distributed`` or mpi4py. A failed rendezvous or a collective that
times out raises :class:`DistError` naming the rank, the phase and the likely cause, and, from
:class:`Arrivals`, the ranks that never joined the collective with the last phase each reached.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from tapdist.dist.launch import Launch, LaunchError, free_port

log = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo", "mpi")

_RENDEZVOUS_CAUSE = (
    "not every rank started, or the server rank's address is not reachable from this rank "
    "(check MASTER_ADDR/MASTER_PORT, firewalls, that all ranks run the same command) or "
    "dist.init_timeout_s is too short for a slow start"
)
_COLLECTIVE_CAUSE = (
    "another rank stopped (look for an error in its log) or is still busy in an earlier phase; "
    "if ranks host unequal work raise dist.timeout_s or set dist.placement=balanced"
)


class DistError(RuntimeError):
    """A rendezvous or collective failed; the message names rank, phase and likely cause."""


class Arrivals:
    """The collective each rank entered last, kept in a key-value store that every rank reaches
    (the rendezvous store, served outside the ranks' Python threads). A rank that hangs or dies
    says nothing itself; when a collective fails, the ranks still waiting read the store and
    name the ranks that never arrived, with the last phase each one reached."""

    #: seconds the process serving the store waits before it exits after a failure
    LINGER_S = 3.0

    def __init__(self, store: Any, rank: int, world_size: int, host: str, served_here: bool):
        self.store, self.rank, self.world_size, self.host = store, rank, world_size, host
        self.served_here = served_here
        self.count = 0

    def arrive(self, what: str) -> None:
        """Record that this rank enters its next collective, ``what``."""
        self.count += 1
        try:
            self.store.set(self._key(self.rank), f"{self.count} {what}")
        except Exception:  # the store is gone: the collective fails next and says so
            pass

    def absent(self) -> str:
        """The other ranks that are not in this rank's current collective, with where each
        is; '' when all are there."""
        try:
            self.store.set_timeout(datetime.timedelta(seconds=10))
            seen = {r: self._read(r) for r in range(self.world_size) if r != self.rank}
        except Exception:
            return f"unknown: the rendezvous store ({self.host}) does not answer"
        return ", ".join(
            f"rank {r} (last in '{what}')" if what else f"rank {r} (in no collective yet)"
            for r, (count, what) in seen.items()
            if count != self.count
        )

    def linger(self) -> None:
        """Before this process ends after a failure: if it serves the store, give the other
        ranks, which time out at about the same moment, a few seconds to read it."""
        if self.served_here and self.world_size > 1:
            time.sleep(self.LINGER_S)

    def _read(self, rank: int) -> tuple[int, str]:
        key = self._key(rank)
        if not self.store.check([key]):
            return 0, ""
        count, _, what = self.store.get(key).decode().partition(" ")
        return int(count), what

    @staticmethod
    def _key(rank: int) -> str:
        return f"tapdist/arrival/{rank}"


class DistContext(ABC):
    """Rank, world size, device, and the collectives tapdist uses."""

    backend: str = "none"
    launcher: str = "single"
    arrivals: Arrivals | None = None

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        """Sum ``tensor`` over all ranks, in place. ``what`` names the phase in errors."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s, in place."""

    @abstractmethod
    def barrier(self, what: str) -> None:
        """Wait until every rank has arrived."""

    def close(self) -> None:  # noqa: B027 (optional: only some contexts hold resources)
        """Release the process group; the context is unusable afterwards."""

    def abort(self, code: int = 1) -> None:
        """End this process now, skipping teardown that could hang or abort after a failed
        collective; the launcher (torchrun, srun --kill-on-bad-exit, mpirun) ends the rest."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.arrivals is not None:
            self.arrivals.linger()
        os._exit(code)

    def _fail(self, phase: str, started: float, err: BaseException | str, cause: str) -> DistError:
        waited = time.monotonic() - started
        absent = self.arrivals.absent() if self.arrivals is not None else ""
        missing = f" Not in this collective: {absent}." if absent else ""
        said = str(err).strip()
        said += "" if said.endswith((".", "!", "?")) else "."
        return DistError(
            f"rank {self.rank}/{self.world_size} ({self.backend}, {socket.gethostname()}): "
            f"{phase} failed after {waited:.1f}s: {said}{missing} Likely cause: {cause}"
        )

    def _arrive(self, what: str) -> None:
        if self.arrivals is not None:
            self.arrivals.arrive(what)


class SingleProcessContext(DistContext):
    """One process holds the whole federation; collectives do nothing."""

    def __init__(self, device: torch.device | None = None):
        super().__init__(0, 1, 0, device or torch.device("cpu"))

    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        pass

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> None:
        if src != 0:
            raise DistError(f"broadcast from rank {src} in a single-process run ({what})")

    def barrier(self, what: str) -> None:
        pass


#: how long :meth:`TorchContext.close` releases the interpreter to the process group's threads
_THREADS_SETTLE_S = 0.05
#: how long :meth:`MpiContext.abort` leaves mpiexec to forward what this rank printed
_OUTPUT_SETTLE_S = 1.0


class TorchContext(DistContext):
    """torch.distributed with the NCCL or gloo backend, on the default (world) group."""

    def __init__(self, backend: str, launch: Launch, device: torch.device, timeout_s: float):
        super().__init__(launch.rank, launch.world_size, launch.local_rank, device)
        self.backend, self.launcher = backend, launch.launcher
        self.timeout = datetime.timedelta(seconds=timeout_s)

    @classmethod
    def create(
        cls,
        backend: str,
        launch: Launch,
        device: torch.device,
        *,
        init_method: str,
        timeout_s: float,
        init_timeout_s: float,
    ) -> TorchContext:
        """Rendezvous through ``init_method`` (``tcp://host:port`` or ``file:///path``)."""
        import torch.distributed as dist

        ctx = cls(backend, launch, device, timeout_s)
        started = time.monotonic()
        try:
            store, host, served_here = _make_store(init_method, launch, init_timeout_s)
            dist.init_process_group(
                backend,
                store=store,
                rank=launch.rank,
                world_size=launch.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                **({"device_id": device} if backend == "nccl" else {}),
            )
        except Exception as err:  # torch raises several error types for one failed rendezvous
            raise ctx._fail(
                f"rendezvous at {init_method}", started, err, _RENDEZVOUS_CAUSE
            ) from None
        ctx.arrivals = Arrivals(store, ctx.rank, ctx.world_size, host, served_here)
        ctx.barrier("rendezvous")
        return ctx

    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        import torch.distributed as dist

        self._run(what, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True))

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> None:
        import torch.distributed as dist

        self._run(what, lambda: dist.broadcast(tensor, src=src, async_op=True))

    def barrier(self, what: str) -> None:
        import torch.distributed as dist

        kwargs = {"device_ids": [self.device.index]} if self.backend == "nccl" else {}
        self._run(what, lambda: dist.barrier(async_op=True, **kwargs))

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
            # A gloo worker thread frees each finished work, and with it the tensors the work
            # holds, which needs the interpreter lock. Once torch._dynamo is imported (peft
            # does) the threads outlive destroy_process_group, so that free can still be
            # pending here; were the interpreter shutting down by then, the thread would abort
            # the process ("terminate called without an active exception"). Release the lock
            # briefly so that it happens now.
            time.sleep(_THREADS_SETTLE_S)

    def _run(self, what: str, op: Any) -> None:
        # Asynchronous launch plus a bounded wait: an NCCL collective would otherwise block in
        # the next synchronisation until the watchdog kills the process, with no message.
        self._arrive(what)
        started = time.monotonic()
        try:
            op().wait(timeout=self.timeout)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as err:
            raise self._fail(what, started, err, _COLLECTIVE_CAUSE) from None


def _make_store(init_method: str, launch: Launch, timeout_s: float) -> tuple[Any, str, bool]:
    """The rendezvous store, where it is served (for messages), and whether by this process."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if init_method.startswith("file://"):
        path = init_method.removeprefix("file://")
        return dist.FileStore(path, launch.world_size), f"file {path}", False
    if init_method.startswith("tcp://"):
        host, _, port = init_method.removeprefix("tcp://").rpartition(":")
        # Under torchrun the agent already serves a store at MASTER_PORT; every rank joins it.
        # It outlives restarts of the workers, so each attempt keeps its keys apart.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            host, int(port), launch.world_size, launch.rank == 0 and not agent, timeout=timeout
        )
        if agent:
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"tapdist/attempt_{attempt}/", store)
            return store, f"served by the torchrun agent at {host}:{port}", False
        return store, f"served by rank 0 at {host}:{port}", launch.rank == 0
    raise DistError(f"init method {init_method!r} must start with tcp:// or file://")


class MpiContext(DistContext):
    """MPI through mpi4py: ``Allreduce`` on host copies of the tensors.

    Collectives are non-blocking requests polled against ``timeout_s`` so a vanished peer gives
    a :class:`DistError` instead of a hang (a blocking MPI call never times out). MPI cannot
    say which rank is missing, so a small TCP store on rank 0 keeps the :class:`Arrivals`.
    """

    backend = "mpi"

    def __init__(
        self, launch: Launch, device: torch.device, timeout_s: float, init_timeout_s: float = 120
    ):
        try:
            from mpi4py import MPI
        except ImportError:
            raise LaunchError(
                "dist.backend = mpi needs mpi4py: pip install 'tapdist[mpi]' (builds it against "
                "your MPI), or use dist.backend=gloo"
            ) from None

        self._mpi, self._comm = MPI, MPI.COMM_WORLD
        rank, world = self._comm.Get_rank(), self._comm.Get_size()
        super().__init__(rank, world, launch.local_rank, device)
        self.launcher, self.timeout_s = launch.launcher, timeout_s
        if (rank, world) != (launch.rank, launch.world_size):
            raise LaunchError(
                f"MPI reports rank {rank} of {world} but the {launch.launcher} "
                f"environment says rank {launch.rank} of {launch.world_size}; "
                "launch with mpirun/mpiexec or srun --mpi=pmi2"
            )
        self.arrivals = _arrivals_store(launch, init_timeout_s)

    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        host = _host_array(tensor)
        self._arrive(what)
        self._wait(what, self._comm.Iallreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM))
        _copy_back(tensor, host)

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> None:
        host = _host_array(tensor)
        self._arrive(what)
        self._wait(what, self._comm.Ibcast(host, root=src))
        _copy_back(tensor, host)

    def barrier(self, what: str) -> None:
        self._arrive(what)
        self._wait(what, self._comm.Ibarrier())

    def _wait(self, what: str, request: Any) -> None:
        started = time.monotonic()
        pause = 1e-5
        while not request.Test():
            if time.monotonic() - started > self.timeout_s:
                raise self._fail(
                    what, started, f"no answer within {self.timeout_s:.0f}s", _COLLECTIVE_CAUSE
                )
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def abort(self, code: int = 1) -> None:
        """End every rank: the others would otherwise wait for this one until they time out."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.arrivals is not None:
            self.arrivals.linger()
        # mpiexec forwards each rank's output on its own time and drops what it has not
        # forwarded yet when Abort ends the job: give it a moment to pass this rank's message on.
        time.sleep(_OUTPUT_SETTLE_S)
        self._comm.Abort(code)


def _host_array(tensor: torch.Tensor) -> Any:
    if tensor.dtype == torch.bfloat16:
        raise DistError("the MPI transport has no bfloat16 sum; use dist.transport_dtype=fp32")
    host = tensor.detach().to("cpu")
    if not host.is_contiguous():
        host = host.contiguous()
    return host.numpy()


def _copy_back(tensor: torch.Tensor, host: Any) -> None:
    source = torch.from_numpy(host)
    if source.data_ptr() != tensor.data_ptr():
        tensor.copy_(source.view_as(tensor))


def _arrivals_store(launch: Launch, timeout_s: float) -> Arrivals | None:
    """:class:`Arrivals` in a TCP store served by rank 0 (address shared over MPI); None, with a
    warning, where the ranks cannot reach it: the run goes on without naming missing ranks."""
    import torch.distributed as dist

    host, port = mpi_rendezvous_address(launch)
    where = f"served by rank 0 at {host}:{port}"
    try:
        store = dist.TCPStore(
            host,
            port,
            launch.world_size,
            launch.rank == 0,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
    except Exception as err:  # torch raises several error types for one failed connection
        log.warning(
            "rank %d: no store %s (%s); a failed collective will not name the missing ranks",
            launch.rank,
            where,
            err,
        )
        return None
    return Arrivals(store, launch.rank, launch.world_size, where, launch.rank == 0)


def mpi_rendezvous_address(launch: Launch) -> tuple[str, int]:
    """Rank 0 picks a free port on its host and broadcasts (address, port) over MPI."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    choice = None
    if comm.Get_rank() == 0:
        choice = (launch.master_addr or socket.gethostname(), launch.master_port or free_port())
    return comm.bcast(choice, root=0)
