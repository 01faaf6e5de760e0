"""Bytes one rank puts on the wire per round, over a config's whole schedule of rounds.

A round's buffer holds the tensors its sampled clients hold (plus one count slot per tensor and
the clients' metrics); this prints the mean, median and largest round next to the whole union.
Counted, not timed: the model is built on the meta device, so the paper's full-size models take
seconds and no memory.

    python -m benchmarks.round_bytes configs/paper_flava.yaml configs/paper_vilt.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    config_path,
    hardware,
    markdown_table,
    meta_union_model,
    run_main,
    shown,
    write_json,
)
from tapdist.config import load_config
from tapdist.data.spec import parse_clients
from tapdist.fl.topology import sample_clients

DEFAULT_CONFIGS = ["configs/paper_flava.yaml", "configs/paper_vilt.yaml"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.round_bytes", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "configs", nargs="*", default=DEFAULT_CONFIGS, help="configs (default: both paper ones)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "round_bytes.json",
        help="where to write the results (default benchmarks/results/round_bytes.json)",
    )
    args = parser.parse_args(argv)
    rows = [schedule(config_path(path)) for path in args.configs]
    headers = [
        "config", "rounds", "union params", "round params: mean / median / max",
        "fp64 MB per round: mean (union)",
    ]  # fmt: skip
    body = [
        [
            f"`{r['config']}`",
            r["rounds"],
            f"{r['union_params'] / 1e6:.1f}M",
            f"{r['round_params_mean'] / 1e6:.1f}M / {r['round_params_median'] / 1e6:.1f}M / "
            f"{r['round_params_max'] / 1e6:.1f}M",
            f"{8 * r['round_params_mean'] / 1e6:.0f} ({8 * r['union_params'] / 1e6:.0f})",
        ]
        for r in rows
    ]
    print(markdown_table(headers, body))
    payload = {"benchmark": "round_bytes", "hardware": hardware(), "rows": rows}
    print(f"\nwrote {write_json(args.json, payload)}")
    return 0


def schedule(path: str) -> dict:
    """Parameters in each round's buffer over ``federation.rounds`` rounds of ``path``."""
    cfg = load_config(path)
    model = meta_union_model(cfg)
    params = dict(model.named_parameters())
    clients = parse_clients(cfg.data, list(model.tasks.values()))
    keys = [set(model.client_names(c.tasks)) for c in clients]
    union = sum(params[n].numel() for n in model.trainable_names())
    fed = cfg.federation
    per_round = []
    for r in range(fed.rounds):
        sampled = sample_clients(cfg.run.seed, r, len(clients), fed.clients_per_round)
        active = set().union(*(keys[c] for c in sampled))
        per_round.append(sum(params[n].numel() for n in active))
    return {
        "config": shown(path),
        "rounds": fed.rounds,
        "union_params": union,
        "round_params_mean": statistics.mean(per_round),
        "round_params_median": statistics.median(per_round),
        "round_params_max": max(per_round),
        "round_params": per_round,
    }


if __name__ == "__main__":
    sys.exit(run_main(main))
