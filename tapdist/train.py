"""`tapdist train`: one federated training run, the same under every launcher."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tapdist.checkpoint import save_state, save_states, write_text
from tapdist.config import Config, ConfigError, dump_config
from tapdist.dist import DistContext, init_context
from tapdist.errors import exit_code, report
from tapdist.fl.loop import RoundLoop
from tapdist.fl.topology import Topology
from tapdist.logs import setup_logging
from tapdist.registry import ALGORITHMS, MODELS, load_builtins, load_plugins
from tapdist.results import format_table, write_results

log = logging.getLogger(__name__)


def train(cfg: Config, run_dir: Path) -> None:
    """Join the other ranks, run every round, and write the run folder (server only)."""
    load_builtins()
    load_plugins(cfg.run.plugins, Path(cfg.source).parent if cfg.source else None)
    ctx = init_context(cfg.dist)
    try:
        _train(cfg, ctx, run_dir)
    except Exception as err:
        if not ctx.is_distributed:
            raise
        # The other ranks would wait for this one until their collectives time out, and a
        # process group torn down mid-collective may abort on exit: report, then end the job.
        report(err, ctx.rank)
        ctx.abort(exit_code(err))
    ctx.close()


def _train(cfg: Config, ctx: DistContext, run_dir: Path) -> None:
    setup_logging(
        ctx.rank, ctx.world_size, cfg.run.log_level, cfg.run.log_all_ranks, is_server=ctx.rank == 0
    )
    started = time.perf_counter()
    names = _algorithms(cfg)
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
    server = topology.is_server(ctx.rank)
    if server:
        _start_run_dir(cfg, run_dir)
        log.info(
            "run %s: %s on %d ranks (%s, %s on %s), %d clients, %d rounds -> %s",
            cfg.run.name,
            " then ".join(names),
            ctx.world_size,
            ctx.launcher,
            ctx.backend,
            ctx.device,
            len(clients),
            cfg.federation.rounds,
            run_dir,
        )
    results: dict = {}
    for i, name in enumerate(names):
        algorithm = ALGORITHMS.get(name)(cfg, model)
        loop = RoundLoop(cfg, ctx, model, algorithm, topology, run_dir / "metrics.jsonl")
        final = loop.run()
        part, own = loop.finish(final)
        for method, per_client in part.items():
            results.setdefault(method, per_client)  # the main algorithm's entry wins
        if i == 0:
            _save_finals(cfg, ctx, run_dir, final if server else None, own)
    if server:
        write_results(run_dir, results, title=f"{cfg.run.name}: {', '.join(results)}")
        log.info("results: %s", run_dir / "results.md")
        print(format_table(results), flush=True)
        log.info("done in %.1fs", time.perf_counter() - started)
    ctx.barrier("end of run")


def _algorithms(cfg: Config) -> list[str]:
    names = [cfg.federation.algorithm, *cfg.federation.baselines]
    for name in names:
        ALGORITHMS.get(name)  # an unknown name fails here, before any work
    if len(set(names)) != len(names):
        raise ConfigError(
            f"federation.algorithm and federation.baselines name an algorithm twice: {names}"
        )
    return names


def _start_run_dir(cfg: Config, run_dir: Path) -> None:
    """The resolved config, an empty metrics file, and no personal states of an earlier run
    (their files are per rank, so a run at another world size would leave extra ones)."""
    write_text(run_dir / "config.yaml", dump_config(cfg))
    write_text(run_dir / "metrics.jsonl", "")
    for old in (run_dir / "final").glob("personal-*.h5"):
        old.unlink()


def _save_finals(cfg: Config, ctx: DistContext, run_dir: Path, final, own: dict) -> None:
    """The final global state (server) and this rank's clients' final personal models."""
    attrs = {"rounds": cfg.federation.rounds, "seed": cfg.run.seed, "model": cfg.model.name}
    if final is not None:
        save_state(run_dir / "final" / "global.h5", final, attrs)
    if own:
        path = run_dir / "final" / f"personal-rank{ctx.rank:04d}.h5"
        save_states(path, {f"client_{c}": s for c, s in own.items()}, attrs)
