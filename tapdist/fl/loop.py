"""The federated round loop, written once for every algorithm and every world size.

Per round, every rank derives the sampled clients from (seed, round), trains those it hosts
through the algorithm's hooks, adds their uploads to a :class:`RoundBuffer`, and joins one
all_reduce that carries the weighted values, the weights and the clients' metrics. Every rank
then holds the same new global state; the server writes the round's metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tapdist.config import Config
from tapdist.dist import DistContext
from tapdist.fl.aggregate import (
    FlatLayout,
    RoundBuffer,
    accumulate,
    accumulation_dtype,
    all_reduce_round,
    finalize,
    pack,
    sends_deltas,
    unpack,
)
from tapdist.fl.algorithms import Algorithm
from tapdist.fl.topology import Topology, derive_seed, sample_clients
from tapdist.models.base import FederatedModel, State

log = logging.getLogger(__name__)

_TRAIN_STREAM = 1  # derive_seed key separating training randomness from other uses


class RoundLoop:
    """Runs ``federation.rounds`` rounds of ``algorithm`` on ``model`` over ``ctx``'s ranks."""

    def __init__(
        self,
        cfg: Config,
        ctx: DistContext,
        model: FederatedModel,
        algorithm: Algorithm,
        topology: Topology,
        metrics_path: Path | None = None,
    ):
        self.cfg, self.ctx, self.model, self.algorithm = cfg, ctx, model, algorithm
        self.topology = topology
        self.layout = FlatLayout.from_shapes(model.union_shapes())
        self.sizes = [c.num_samples for c in model.clients()]
        self.keys = {c: _checked_keys(model, self.layout, c) for c in range(len(self.sizes))}
        self.stat_names = (*algorithm.metric_names, "train_s")
        self.deltas = sends_deltas(cfg.dist.transport_dtype)
        self.metrics_path = metrics_path if topology.is_server(ctx.rank) else None

    def run(self) -> State:
        """All rounds from the model's initial state; returns the final global state."""
        state = self.initial_state()
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            self.metrics_path.write_text("")
        rounds = self.cfg.federation.rounds
        for r in range(rounds):
            state, record = self.round(r, state)
            if self.metrics_path is not None:
                with self.metrics_path.open("a") as out:
                    out.write(json.dumps(record) + "\n")
                log.info(_summary(record, rounds, self.stat_names[0]))
        return state

    def initial_state(self) -> State:
        """The model's initial state, made identical on every rank by a broadcast from rank 0."""
        state = self.model.initial_state()
        if self.ctx.is_distributed:
            flat = pack(self.layout, state).to(self.ctx.device)
            self.ctx.broadcast(flat, self.topology.server_rank, "initial state broadcast")
            state = unpack(self.layout, flat, state)
        return state

    def round(self, r: int, state: State) -> tuple[State, dict]:
        """One round: train the hosted sampled clients, aggregate, return (state, metrics)."""
        started = time.perf_counter()
        fed = self.cfg.federation
        sampled = sample_clients(self.cfg.run.seed, r, len(self.sizes), fed.clients_per_round)
        # Only tensors some sampled client holds can change; every rank derives the same set.
        layout = self.layout.restrict({k for c in sampled for k in self.keys[c]})
        buf = RoundBuffer.zeros(
            layout,
            len(sampled),
            len(self.stat_names),
            self.ctx.device,
            accumulation_dtype(self.cfg.dist.transport_dtype),
        )
        for slot, client in enumerate(sampled):
            if self.topology.host_of[client] == self.ctx.rank:
                self._train(r, slot, client, state, buf)
        trained = time.perf_counter()
        sent = all_reduce_round(
            self.ctx, buf, self.cfg.dist.transport_dtype, f"round {r} aggregation all_reduce"
        )
        updated = finalize(buf, {n: state[n] for n in layout.names}, self.deltas)
        new_state = {n: updated.get(n, state[n]) for n in state}
        done = time.perf_counter()
        record = self._record(r, sampled, buf, sent, (started, trained, done))
        return new_state, record

    def _train(self, r: int, slot: int, client: int, state: State, buf: RoundBuffer) -> None:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(
            derive_seed(self.cfg.run.seed, _TRAIN_STREAM, r, client)
        )
        global_sub = {k: state[k].clone() for k in self.keys[client]}
        update = self.algorithm.client_round(client, global_sub, r, generator)
        if set(update.upload) != set(self.keys[client]):
            raise RuntimeError(_key_mismatch(client, self.keys[client], update.upload))
        reference = state if self.deltas else None
        accumulate(buf, update.upload, float(self.sizes[client]), reference)
        values = [float(update.metrics[n]) for n in self.algorithm.metric_names]
        values.append(time.perf_counter() - started)
        buf.stats[slot] = torch.tensor(values, dtype=buf.flat.dtype)

    def _record(
        self,
        r: int,
        sampled: Sequence[int],
        buf: RoundBuffer,
        sent: int,
        times: tuple[float, float, float],
    ) -> dict:
        stats = buf.stats.cpu().tolist()
        clients, busy = {}, {}
        for client, row in zip(sampled, stats):
            rank = self.topology.host_of[client]
            clients[str(client)] = {
                "rank": rank,
                "samples": self.sizes[client],
                **dict(zip(self.stat_names, row)),
            }
            busy[rank] = busy.get(rank, 0.0) + row[-1]
        started, trained, done = times
        return {
            "round": r,
            "sampled": list(sampled),
            "clients": clients,
            "tensors_updated": int((buf.counts > 0).sum()),
            "bytes_sent_per_rank": sent,
            "seconds": {
                "train_max_rank": max(busy.values()),
                "train_here": trained - started,
                "aggregate": done - trained,
                "round": done - started,
            },
        }


def _checked_keys(model: FederatedModel, layout: FlatLayout, client: int) -> tuple[str, ...]:
    keys = tuple(model.client_keys(client))
    unknown = [k for k in keys if k not in layout]
    if unknown:
        raise ValueError(f"client {client} holds tensors the union model lacks: {unknown}")
    return keys


def _key_mismatch(client: int, expected: Sequence[str], got: dict) -> str:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    return f"client {client} uploaded the wrong tensors: missing {missing}, unexpected {extra}"


def _summary(record: dict, rounds: int, metric: str) -> str:
    clients = record["clients"].values()
    mean = sum(c[metric] * c["samples"] for c in clients) / sum(c["samples"] for c in clients)
    sec = record["seconds"]
    return (
        f"round {record['round'] + 1}/{rounds}: clients {record['sampled']}, "
        f"{metric} {mean:.4f}, {sec['round']:.2f}s (train {sec['train_here']:.2f}s, "
        f"aggregate {sec['aggregate']:.3f}s, sent {_size(record['bytes_sent_per_rank'])})"
    )


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
