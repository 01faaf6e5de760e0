"""`tapdist train`: one federated training run, the same under every launcher."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from tapdist.checkpoint import save_state, save_states, write_text
from tapdist.config import Config, ConfigError
from tapdist.dist import DistContext, DistError, init_context
from tapdist.dist.faults import inject_fault
from tapdist.dist.launch import restart_count
from tapdist.errors import PeerFailed, Reported, exit_code, report
from tapdist.fl.checkpoints import Checkpoint, Checkpointer, job_identity, newest_checkpoint
from tapdist.fl.loop import RoundLoop
from tapdist.fl.topology import Topology
from tapdist.logs import rank_log_file, require_tensorboard, setup_logging
from tapdist.registry import ALGORITHMS, MODELS, load_builtins, load_plugins
from tapdist.results import format_table, write_results
from tapdist.run_dir import RunLock, check_writable, earlier_outputs, start_fresh

log = logging.getLogger(__name__)
T = TypeVar("T")
#: the exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def train(cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Join the other ranks, run every round (from the newest checkpoint in ``run_dir`` when
    ``resume``; over an earlier run's checkpoints when ``overwrite``), and write the run
    folder."""
    load_builtins()
    load_plugins(cfg.run.plugins, Path(cfg.source).parent if cfg.source else None)
    ctx = init_context(cfg.dist)
    lock: list[RunLock] = []  # the server's claim on the folder, once its checks passed
    try:
        _train(cfg, ctx, run_dir, resume, overwrite, lock)
    except KeyboardInterrupt:
        _release(lock)
        if ctx.rank == 0:  # Ctrl-C reaches every rank of a terminal's job
            print(f"tapdist: interrupted; {_way_on(run_dir)}", file=sys.stderr, flush=True)
        if ctx.is_distributed:
            ctx.abort(INTERRUPTED)
        raise SystemExit(INTERRUPTED) from None
    except Exception as err:
        _release(lock)
        if not ctx.is_distributed:
            raise
        # The other ranks would wait for this one until their collectives time out, and a
        # process group torn down mid-collective may abort on exit: report, then end the job.
        if not isinstance(err, Reported):
            report(err, ctx.rank)
        ctx.abort(exit_code(err))
    _release(lock)
    ctx.close()


def _way_on(run_dir: Path) -> str:
    """How to go on after an interruption: from the newest checkpoint, if there is one."""
    try:
        newest = newest_checkpoint(run_dir / "checkpoints")
    except ConfigError:
        newest = None
    if newest is None:
        return "no checkpoint was written yet: start the run again"
    return (
        f"continue from the newest checkpoint ({newest.folder.name}) with `tapdist train CONFIG "
        f"--resume {run_dir}`"
    )


def _release(lock: list[RunLock]) -> None:
    for held in lock:
        held.release()
    lock.clear()


@dataclass
class Resume:
    """The checkpoint a job goes on from, with what this rank read of it."""

    checkpoint: Checkpoint
    state: dict  # the global state
    clients: dict  # what the algorithm kept for this rank's clients

    def __getattr__(self, name: str):  # folder, manifest, round, algorithm_index, finished
        return getattr(self.checkpoint, name)


def _train(
    cfg: Config, ctx: DistContext, run_dir: Path, resume: bool, overwrite: bool, lock: list
) -> None:
    logging_args = (ctx.rank, ctx.world_size, cfg.run.log_level, cfg.run.log_all_ranks)
    setup_logging(*logging_args, is_server=ctx.rank == 0)
    started = time.perf_counter()
    ready = _on_every_rank(ctx, lambda: _prepare(cfg, ctx, run_dir, resume, overwrite))
    names, model, topology, checkpoints, start, kept = ready
    server = topology.is_server(ctx.rank)
    # every rank's input is good: now the server claims the folder, the others hear how it went
    _on_every_rank(ctx, lambda: lock.append(RunLock.claim(run_dir)) if server else None)
    if cfg.run.log_files:  # only now: bad input must leave the run folder untouched
        log_file = rank_log_file(run_dir, ctx.rank)
        setup_logging(*logging_args, is_server=ctx.rank == 0, log_file=log_file)
    if start is not None:
        log.info("resuming from %s (restart %d)", start.folder, restart_count())
    if server:
        if start is None:
            start_fresh(cfg, run_dir)
        elif kept is not None:
            write_text(run_dir / "metrics.jsonl", kept)
        log.info(
            "run %s: %s on %d ranks (%s, %s on %s), %d clients, %d rounds -> %s",
            cfg.run.name,
            " then ".join(names),
            ctx.world_size,
            ctx.launcher,
            ctx.backend,
            ctx.device,
            topology.num_clients,
            cfg.federation.rounds,
            run_dir,
        )
    results = dict(start.manifest["results"]) if start else {}
    budget = [cfg.run.rounds_per_job or cfg.federation.rounds * len(names)]
    stop = StopRequest(ctx)
    for i, name in enumerate(names):
        if start is not None and (
            i < start.algorithm_index or (i == start.algorithm_index and start.finished)
        ):
            continue  # its results came with the checkpoint
        job = (cfg, ctx, model, topology, checkpoints, run_dir)
        if not _run_algorithm(job, i, name, start, results, budget, stop):
            if server:
                why = "run.rounds_per_job" if budget[0] == 0 else "a stop signal"
                log.info(
                    "stopped by %s after a checkpoint; continue with "
                    "`tapdist train CONFIG --resume %s`",
                    why,
                    run_dir,
                )
            ctx.barrier("end of job")
            return
    if server:
        write_results(run_dir, results, title=f"{cfg.run.name}: {', '.join(results)}")
        log.info("results: %s", run_dir / "results.md")
        print(format_table(results), flush=True)
        log.info("done in %.1fs", time.perf_counter() - started)
    ctx.barrier("end of run")


def _prepare(cfg: Config, ctx: DistContext, run_dir: Path, resume: bool, overwrite: bool) -> tuple:
    """Everything that reads the input and writes nothing: the model and its data files, the
    placement, the checkpoint to resume from (read whole, so a damaged one fails now), and the
    data of the clients this rank hosts (so that a damaged file fails now, not in the middle of
    the run)."""
    if resume and overwrite:
        raise ConfigError("--resume goes on with a run and --overwrite starts over: give one")
    names = algorithm_names(cfg)
    check_writable(run_dir)
    RunLock.check(run_dir)  # another live run's folder: say so first
    if cfg.run.tensorboard and ctx.rank == 0:
        require_tensorboard()  # the server writes the scalars
    model = MODELS.get(cfg.model.name)(cfg, ctx.device)
    clients = model.clients()
    if len(clients) != cfg.federation.clients:
        raise ConfigError(
            f"model '{cfg.model.name}' has {len(clients)} clients but "
            f"federation.clients = {cfg.federation.clients}; make them agree"
        )
    topology = Topology(
        ctx.world_size,
        tuple(c.num_samples for c in clients),
        cfg.dist.server_hosts_clients,
        cfg.dist.placement,
        cfg.dist.allow_idle_ranks,
    )
    checkpoints = Checkpointer(cfg, ctx, topology, run_dir)
    start = None
    if resume:
        start = _resume_point(checkpoints, run_dir, names, required=True)
    elif restart_count() > 0:  # a launcher restarted the job: go on from its checkpoint
        start = _resume_point(checkpoints, run_dir, names, required=False)
        if overwrite and start is not None and start.manifest.get("job") != job_identity():
            start = None  # the earlier run's, which this job was asked to overwrite
    hosted = topology.clients_of(ctx.rank)
    if start is not None:
        state = start.global_state() if not start.finished else {}
        clients = start.client_states(set(hosted)) if not start.finished else {}
        start = Resume(start, state, clients)
    for client in hosted:
        model.train_data(client)
        model.test_data(client)
    if start is None and not overwrite and (earlier := checkpoints.newest()) is not None:
        raise ConfigError(
            f"{run_dir} holds the checkpoints of an earlier run (newest: {earlier.folder.name}), "
            f"which a new run there would mix with its own; continue that run with `--resume "
            f"{run_dir}`, start this one in another --run-dir, or start over there with "
            "--overwrite (which removes that run's checkpoints and results)"
        )
    if start is None and not overwrite and (left := earlier_outputs(run_dir)):
        shown = ", ".join(str(p.relative_to(run_dir)) for p in left[:3])
        raise ConfigError(
            f"{run_dir} holds the outputs of an earlier run ({shown}{', ...' if left[3:] else ''})"
            f"; start this one in another --run-dir, or start over there with --overwrite "
            "(which removes those files)"
        )
    kept = None  # the metrics lines a resumed run keeps, checked now, written after the claim
    if start is not None and topology.is_server(ctx.rank):
        kept = _kept_metrics(run_dir / "metrics.jsonl", names, start)
    return names, model, topology, checkpoints, start, kept


def _on_every_rank(ctx: DistContext, prepare: Callable[[], T]) -> T:
    """``prepare()`` here, then one small all_reduce so each rank knows whether all others
    succeeded. A rank whose input is bad (say a damaged part of a data file that it alone
    reads) stops with its own error, every other rank with :class:`PeerFailed`, and all of
    them before anything is written."""
    try:
        prepared = prepare()
    except Exception as err:
        if not ctx.is_distributed:
            raise
        # Report first: once the others know, the first of them to exit makes the launcher
        # (mpiexec, torchrun, srun) end this process too, message or not.
        report(err, ctx.rank)
        with contextlib.suppress(DistError):  # the others are gone already
            _agree_to_start(ctx, exit_code(err))
        raise Reported(exit_code(err)) from err
    _agree_to_start(ctx, 0)
    return prepared


def _agree_to_start(ctx: DistContext, code: int) -> None:
    """Share this rank's exit code (0: ready); raise :class:`PeerFailed` on a ready rank when
    another one failed."""
    if not ctx.is_distributed:
        return
    codes = torch.zeros(ctx.world_size, device=ctx.device)
    codes[ctx.rank] = code
    ctx.all_reduce(codes, "start check")
    failed = [r for r, c in enumerate(codes.tolist()) if c]
    if failed and not code:
        raise PeerFailed(failed, int(codes[failed[0]]))


def _run_algorithm(
    job, index: int, name: str, start, results: dict, budget: list[int], stop: StopRequest
) -> bool:
    """Algorithm ``index`` from its start (or the checkpoint) to its results, within the job's
    round budget; False when the budget or a stop signal ends it early (after a checkpoint)."""
    cfg, ctx, model, topology, checkpoints, run_dir = job
    algorithm = ALGORITHMS.get(name)(cfg, model)
    loop = RoundLoop(cfg, ctx, model, algorithm, topology, run_dir / "metrics.jsonl", name)
    first, state = 0, None
    if start is not None and index == start.algorithm_index:
        first, state = _restore(start, algorithm, ctx.device)
    last = min(cfg.federation.rounds, first + budget[0])
    done, stopped = [first], [False]

    def after_round(r: int, state: dict) -> bool:
        done[0] = r + 1
        inject_fault(ctx.rank, r)  # a testing aid, inert unless TAPDIST_FAULT is set
        stopped[0] = stop.agreed(f"round {r} stop check")
        if checkpoints.due(r) or r + 1 == last or stopped[0]:
            checkpoints.save(index, name, algorithm, r + 1, state, results)
        return stopped[0]

    final = loop.run(state, first, last, after_round)
    budget[0] -= done[0] - first
    if done[0] < cfg.federation.rounds or stopped[0]:
        return False  # a stop in the last round comes before the post-FL stage, too
    part, own = loop.finish(final)
    for method, per_client in part.items():
        results.setdefault(method, per_client)  # the main algorithm's entry wins
    if index == 0:
        server = topology.is_server(ctx.rank)
        _save_finals(cfg, ctx, run_dir, final if server else None, own)
    ctx.barrier(f"{name} finished")  # every rank wrote its final models
    # its last checkpoint now carries its results: a later job goes on with the next algorithm
    checkpoints.finished(index, name, cfg.federation.rounds, results)
    return True


class StopRequest:
    """SIGTERM or SIGUSR1 (a scheduler ending or preempting the job, e.g. Slurm's
    ``--signal``) asks the run to stop after the current round, with a checkpoint. Ranks may get
    the signal at different moments, so they agree on it after every round."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, ctx: DistContext):
        self.ctx, self.signal = ctx, 0
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        log.warning("got signal %d: stopping after this round, with a checkpoint", signum)

    def agreed(self, what: str) -> bool:
        """Whether any rank got a stop signal (one tiny all_reduce when distributed)."""
        if not self.ctx.is_distributed:
            return bool(self.signal)
        flag = torch.tensor([float(self.signal)], device=self.ctx.device)
        self.ctx.all_reduce(flag, what)
        return bool(flag.item())


def _resume_point(
    checkpoints: Checkpointer, run_dir: Path, names: list[str], required: bool
) -> Checkpoint | None:
    start = checkpoints.latest()
    if start is None and not required:
        return None
    if start is None:
        raise ConfigError(
            f"--resume {run_dir}: no complete checkpoint in {checkpoints.root}; "
            "start the run without --resume"
        )
    if start.manifest["algorithm"] != names[start.algorithm_index]:
        raise ConfigError(
            f"cannot resume from {start.folder}: it holds algorithm "
            f"'{start.manifest['algorithm']}' where this config runs "
            f"'{names[start.algorithm_index]}'"
        )
    return start


def _restore(start: Resume, algorithm, device: torch.device) -> tuple[int, dict]:
    """The checkpoint's round and global state (on ``device``, where a fresh run's starts),
    with the algorithm's state restored."""
    algorithm.load_state_dict(start.manifest["algorithm_state"])
    for client, state in start.clients.items():
        algorithm.load_client_state(client, state)
    return start.round, {n: t.to(device) for n, t in start.state.items()}


def _kept_metrics(path: Path, names: list[str], start: Checkpoint) -> str | None:
    """The metrics file without the lines of rounds after the checkpoint (they will run
    again) and a last line a killed job left half-written (None: no file)."""
    if not path.exists():
        return None
    kept = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ConfigError(
                    f"{path}, line {number}: not a metrics record; repair or remove the line "
                    "and resume again"
                ) from None
            log.warning("%s: dropping its last line, cut short by an interrupted job", path)
            continue
        if (
            not isinstance(record, dict)
            or record.get("algorithm") not in names
            or not isinstance(record.get("round"), int)
        ):
            raise ConfigError(
                f"{path}, line {number}: not a round record of this run's algorithms "
                f"({', '.join(names)}); repair or remove the line and resume again"
            )
        index = names.index(record["algorithm"])
        if (index, record["round"]) < (start.algorithm_index, start.round):
            kept.append(line)
    return "".join(x + "\n" for x in kept)


def algorithm_names(cfg: Config) -> list[str]:
    """The algorithm and its baselines, in run order; an unknown or repeated name fails here,
    before any work."""
    names = [cfg.federation.algorithm, *cfg.federation.baselines]
    for name in names:
        ALGORITHMS.get(name)
    if len(set(names)) != len(names):
        raise ConfigError(
            f"federation.algorithm and federation.baselines name an algorithm twice: {names}"
        )
    return names


def _save_finals(cfg: Config, ctx: DistContext, run_dir: Path, final, own: dict) -> None:
    """The final global state (server) and this rank's clients' final personal models."""
    attrs = {"rounds": cfg.federation.rounds, "seed": cfg.run.seed, "model": cfg.model.name}
    if final is not None:
        save_state(run_dir / "final" / "global.h5", final, attrs)
    if own:
        path = run_dir / "final" / f"personal-rank{ctx.rank:04d}.h5"
        save_states(path, {f"client_{c}": s for c, s in own.items()}, attrs)
