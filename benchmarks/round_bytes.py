"""Bytes one rank puts on the wire per round, over a config's whole schedule of rounds.

A round's buffer holds the tensors its sampled clients hold (plus one count slot per tensor and
the clients' metrics); this prints the mean, median and largest round next to the whole union.

    python benchmarks/round_bytes.py configs/paper_flava.yaml configs/paper_vilt.yaml
"""

from __future__ import annotations

import argparse
import statistics

from tapdist.config import load_config
from tapdist.data.spec import parse_clients
from tapdist.fl.topology import sample_clients
from tapdist.models.federated import build_union_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()
    print(
        "| config | rounds | union params | round params: mean / median / max | "
        "fp64 MB per round: mean (union) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for path in args.configs:
        print(row(path))


def row(path: str) -> str:
    cfg = load_config(path)
    model = build_union_model(cfg)
    params = dict(model.named_parameters())
    clients = parse_clients(cfg.data, list(model.tasks.values()))
    keys = [set(model.client_names(c.tasks)) for c in clients]
    union = sum(params[n].numel() for n in model.trainable_names())
    fed = cfg.federation
    per_round = []
    for r in range(fed.rounds):
        active = set().union(
            *(keys[c] for c in sample_clients(cfg.run.seed, r, len(clients), fed.clients_per_round))
        )
        per_round.append(sum(params[n].numel() for n in active))
    mean = statistics.mean(per_round)
    return (
        f"| `{path}` | {fed.rounds} | {union / 1e6:.1f}M | {mean / 1e6:.1f}M / "
        f"{statistics.median(per_round) / 1e6:.1f}M / {max(per_round) / 1e6:.1f}M | "
        f"{8 * mean / 1e6:.0f} ({8 * union / 1e6:.0f}) |"
    )


if __name__ == "__main__":
    main()
