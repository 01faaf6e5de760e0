"""Bytes one rank puts on the wire per round, over a config's whole schedule of rounds.

A round's buffer holds the tensors its sampled clients hold (plus one count slot per tensor and
the clients' metrics); this prints the mean, median and largest round next to the whole union,
and sets each round's buffer against what its sampled clients would send as full fp32
state-dict uploads (every parameter the client's forward reads, frozen backbone included): the
bytes a rank sends for the round's clients, not a client's own sub-state (``comm`` counts that).
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
from tapdist.info import frozen_used

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
        "fp64 MB per round: mean (union)", "full uploads MB per round: mean",
        "full uploads / round buffer: fp64, fp32 (mean over rounds)",
    ]  # fmt: skip
    body = [
        [
            f"`{r['config']}`",
            r["rounds"],
            f"{r['union_params'] / 1e6:.1f}M",
            f"{r['round_params_mean'] / 1e6:.1f}M / {r['round_params_median'] / 1e6:.1f}M / "
            f"{r['round_params_max'] / 1e6:.1f}M",
            f"{8 * r['round_params_mean'] / 1e6:.0f} ({8 * r['union_params'] / 1e6:.0f})",
            f"{r['full_upload_bytes_mean'] / 1e6:.0f}",
            f"{r['shrink_mean']['fp64']:.1f}x, {r['shrink_mean']['fp32']:.1f}x",
        ]
        for r in rows
    ]
    print(markdown_table(headers, body))
    payload = {"benchmark": "round_bytes", "hardware": hardware(), "rows": rows}
    print(f"\nwrote {write_json(args.json, payload)}")
    return 0


def schedule(path: str) -> dict:
    """Parameters in each round's buffer over ``federation.rounds`` rounds of ``path``, and the
    full uploads of each round's sampled clients against the buffer's bytes."""
    cfg = load_config(path)
    model = meta_union_model(cfg)
    params = dict(model.named_parameters())
    clients = parse_clients(cfg.data, list(model.tasks.values()))
    keys = [set(model.client_names(c.tasks)) for c in clients]
    full = [  # a full fp32 state-dict upload: the client's trainable and frozen parameters
        4 * (sum(params[n].numel() for n in k) + frozen_used(model, c.tasks))
        for k, c in zip(keys, clients)
    ]
    union = sum(params[n].numel() for n in model.trainable_names())
    fed = cfg.federation
    per_round, tensors, uploads = [], [], []
    for r in range(fed.rounds):
        sampled = sample_clients(cfg.run.seed, r, len(clients), fed.clients_per_round)
        active = set().union(*(keys[c] for c in sampled))
        per_round.append(sum(params[n].numel() for n in active))
        tensors.append(len(active))
        uploads.append(sum(full[c] for c in sampled))
    wire = {  # values, and one fp32 or fp64 count slot per tensor, as the round's buffer holds
        "fp64": [8 * (p + t) for p, t in zip(per_round, tensors)],
        "fp32": [4 * (p + t) for p, t in zip(per_round, tensors)],
        "bf16": [2 * p + 4 * t for p, t in zip(per_round, tensors)],
    }
    return {
        "config": shown(path),
        "rounds": fed.rounds,
        "union_params": union,
        "round_params_mean": statistics.mean(per_round),
        "round_params_median": statistics.median(per_round),
        "round_params_max": max(per_round),
        "full_upload_bytes_mean": statistics.mean(uploads),
        "shrink_mean": {
            d: statistics.mean(u / w for u, w in zip(uploads, b)) for d, b in wire.items()
        },
        "round_params": per_round,
    }


if __name__ == "__main__":
    sys.exit(run_main(main))
