"""`tapdist train`: one federated training run, the same under every launcher."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tapdist.checkpoint import save_state, write_text
from tapdist.config import Config, ConfigError, dump_config
from tapdist.dist import DistContext, init_context
from tapdist.errors import exit_code, report
from tapdist.fl.loop import RoundLoop
from tapdist.fl.topology import Topology
from tapdist.logs import setup_logging
from tapdist.registry import ALGORITHMS, MODELS, load_builtins, load_plugins

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
    model = MODELS.get(cfg.model.name)(cfg, ctx.device)
    algorithm = ALGORITHMS.get(cfg.federation.algorithm)(cfg, model)
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
        write_text(run_dir / "config.yaml", dump_config(cfg))
        log.info(
            "run %s: %d ranks (%s, %s on %s), %d clients, %d rounds -> %s",
            cfg.run.name,
            ctx.world_size,
            ctx.launcher,
            ctx.backend,
            ctx.device,
            len(clients),
            cfg.federation.rounds,
            run_dir,
        )
    loop = RoundLoop(cfg, ctx, model, algorithm, topology, run_dir / "metrics.jsonl")
    final = loop.run()
    if server:
        save_state(
            run_dir / "final" / "global.h5",
            final,
            {"rounds": cfg.federation.rounds, "seed": cfg.run.seed, "model": cfg.model.name},
        )
        log.info(
            "done in %.1fs: %s", time.perf_counter() - started, run_dir / "final" / "global.h5"
        )
    ctx.barrier("end of run")
