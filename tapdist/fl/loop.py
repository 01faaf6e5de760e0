"""The federated round loop, written once for every algorithm and every world size.

Per round, every rank derives the sampled clients from (seed, round), trains those it hosts
through the algorithm's hooks, adds their uploads to a :class:`RoundBuffer`, and joins one
all_reduce that carries the weighted values, the weights and the clients' metrics (with the bf16
wire, a second small one carries the weights and metrics). Every rank
then holds the same new global state; the server writes the round's metrics.

After the rounds, every rank finishes the clients it hosts (the algorithm's post-FL stage, e.g.
TAP's distillation) and evaluates each of their final models on held-out data; one more
all_reduce brings every client's metrics to every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tapdist.config import Config
from tapdist.dist import DistContext
from tapdist.evaluate import METRICS
from tapdist.fl.aggregate import (
    FlatLayout,
    RoundBuffer,
    Workspace,
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
from tapdist.logs import Progress, TensorBoardScalars, format_bytes
from tapdist.models.base import FederatedModel, State
from tapdist.results import task_entry

log = logging.getLogger(__name__)

# derive_seed keys separating the randomness of each use
_TRAIN_STREAM = 1
_FINISH_STREAM = 2


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
        name: str = "",
    ):
        self.cfg, self.ctx, self.model, self.algorithm = cfg, ctx, model, algorithm
        self.name = name or algorithm.method  # the registered name, as metrics record it
        self.topology = topology
        self.layout = FlatLayout.from_shapes(model.union_shapes())
        self.clients = list(model.clients())
        self.sizes = [c.num_samples for c in self.clients]
        self.keys = {c: _checked_keys(model, self.layout, c) for c in range(len(self.sizes))}
        self.stat_names = (*algorithm.metric_names, "train_s")
        self.deltas = sends_deltas(cfg.dist.transport_dtype)
        self.workspace = Workspace()  # every round's buffer, in one block of memory
        self.metrics_path = metrics_path if topology.is_server(ctx.rank) else None

    def run(
        self,
        state: State | None = None,
        start: int = 0,
        stop: int | None = None,
        after_round: Callable[[int, State], bool] | None = None,
    ) -> State:
        """Rounds ``start`` to ``stop`` (default: all) from ``state`` (default: the model's
        initial state); ``after_round(r, state)`` runs after each and ends the loop early by
        returning True. Returns the global state."""
        state = self.initial_state() if state is None else state
        stop = self.cfg.federation.rounds if stop is None else stop
        server = self.metrics_path is not None
        with (
            Progress(
                f"{self.name} rounds", self.cfg.federation.rounds, bar=server, done=start
            ) as bar,
            self._scalars(start) as scalars,
        ):
            for r in range(start, stop):
                state, record = self.round(r, state, bar)
                if server:
                    self._write(record, scalars)
                bar.step(f"round {r + 1}: {_summary(record)}")
                if after_round is not None and after_round(r, state):
                    break
        return state

    def _scalars(self, start: int):
        """The server's TensorBoard writer for this algorithm (``run.tensorboard``), else a
        context holding None."""
        if self.metrics_path is None or not self.cfg.run.tensorboard:
            return contextlib.nullcontext(None)
        folder = self.metrics_path.parent / "tensorboard" / self.name
        return TensorBoardScalars(folder, first_round=start)

    def _write(self, record: dict, scalars: TensorBoardScalars | None) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        if scalars is not None:
            scalars.add(record)

    def finish(self, state: State) -> tuple[dict, dict[int, State]]:
        """Each hosted client's post-FL stage and the evaluation of its final models.

        Returns (results, own): results is method -> client -> task -> metrics for every
        client of the federation (identical on every rank); own maps each client this rank
        hosts to its final model under the algorithm's own method key.
        """
        methods = self.algorithm.methods
        slots = _result_slots(methods, self.clients, self.model.task_kinds())
        values = torch.zeros(len(slots), dtype=torch.float64)
        hosted = self.topology.clients_of(self.ctx.rank)
        own = {}
        label = f"{self.name} post-FL stage and evaluation"
        if self.ctx.is_distributed:
            label += f" of rank {self.ctx.rank}'s clients"
        with Progress(label, len(hosted), bar=self.topology.is_server(self.ctx.rank)) as bar:
            for client in hosted:
                started = time.perf_counter()
                bar.note(f"client {client}: post-FL stage")
                models = self._finish_client(client, state)
                finished = time.perf_counter()
                bar.note(f"client {client}: evaluation")
                for method, final in models.items():
                    for task, metrics in self.model.evaluate(client, final).items():
                        for metric, value in metrics.items():
                            values[slots[(method, client, task, metric)]] = value
                own[client] = models[self.algorithm.method]
                bar.step(
                    f"client {client}: post-FL stage {finished - started:.1f}s, evaluation of "
                    f"{len(models)} model{'s' * (len(models) != 1)} "
                    f"{time.perf_counter() - finished:.1f}s"
                )
        if self.ctx.is_distributed:
            log.debug("%s: waiting for the other ranks' clients", self.name)
        values = values.to(self.ctx.device)
        self.ctx.all_reduce(values, f"{self.name} results all_reduce")
        return _results(slots, values.cpu().tolist(), self.model.task_kinds()), own

    def _finish_client(self, client: int, state: State) -> dict[str, State]:
        seed = derive_seed(self.cfg.run.seed, _FINISH_STREAM, client)
        generator = torch.Generator().manual_seed(seed)
        global_sub = {k: state[k].clone() for k in self.keys[client]}
        models = self.algorithm.finish(client, global_sub, generator)
        if set(models) != set(self.algorithm.methods):
            raise RuntimeError(
                f"{type(self.algorithm).__name__}.finish returned {sorted(models)}; "
                f"its methods are {list(self.algorithm.methods)}"
            )
        return models

    def initial_state(self) -> State:
        """The model's initial state, made identical on every rank by a broadcast from rank 0."""
        state = self.model.initial_state()
        if self.ctx.is_distributed:
            flat = pack(self.layout, state).to(self.ctx.device)
            self.ctx.broadcast(flat, self.topology.server_rank, "initial state broadcast")
            state = unpack(self.layout, flat, state)
        return state

    def round(self, r: int, state: State, progress: Progress | None = None) -> tuple[State, dict]:
        """One round: train the hosted sampled clients, aggregate, return (state, metrics);
        ``progress`` hears of each client trained."""
        started = time.perf_counter()
        fed = self.cfg.federation
        sampled = sample_clients(self.cfg.run.seed, r, len(self.sizes), fed.clients_per_round)
        # Only tensors some sampled client uploads can change; every rank derives the same set.
        uploaded = {k for c in sampled for k in self.keys[c]} if self.algorithm.uploads else set()
        layout = self.layout.restrict(uploaded)
        buf = RoundBuffer.zeros(
            layout,
            len(sampled),
            len(self.stat_names),
            self.ctx.device,
            accumulation_dtype(self.cfg.dist.transport_dtype),
            self.workspace,
        )
        mine = [(s, c) for s, c in enumerate(sampled) if self.topology.host_of[c] == self.ctx.rank]
        for i, (slot, client) in enumerate(mine, 1):
            self._train(r, slot, client, state, buf)
            if progress is not None:
                progress.note(
                    f"round {r + 1}: client {client} trained ({i}/{len(mine)} on this rank)"
                )
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
        expected = self.keys[client] if self.algorithm.uploads else ()
        if set(update.upload) != set(expected):
            raise RuntimeError(_key_mismatch(client, expected, update.upload))
        reference = state if self.deltas else None
        accumulate(buf, update.upload, float(self.sizes[client]), reference)
        values = [float(update.metrics.get(n, 0.0)) for n in self.algorithm.metric_names]
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
        clients, busy, rows = {}, {}, {}
        for client, row in zip(sampled, stats):
            rank = self.topology.host_of[client]
            rows[client] = _client_stats(self.stat_names, row, self.clients[client].tasks)
            clients[str(client)] = {"rank": rank, "samples": self.sizes[client], **rows[client]}
            busy[rank] = busy.get(rank, 0.0) + row[-1]
        started, trained, done = times
        return {
            "algorithm": self.name,
            "round": r,
            "sampled": list(sampled),
            "clients": clients,
            **self.algorithm.round_summary(rows),
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


def _client_stats(names: Sequence[str], row: Sequence[float], tasks: Sequence[str]) -> dict:
    """A client's named stats, without the per-task entries of tasks it does not have."""
    return {n: v for n, v in zip(names, row) if "." not in n or n.split(".", 1)[1] in tasks}


def _summary(record: dict) -> str:
    losses = [
        v
        for c in record["clients"].values()
        for k, v in c.items()
        if "." in k and k.partition(".")[0].endswith("_loss")
    ]
    mean = sum(losses) / len(losses) if losses else float("nan")
    sec = record["seconds"]
    text = (
        f"clients {record['sampled']}, mean task loss {mean:.4f}, {sec['round']:.2f}s "
        f"(aggregate {sec['aggregate']:.3f}s, sent {format_bytes(record['bytes_sent_per_rank'])})"
    )
    if "replacements" in record:
        n = sum(record["replacements"].values())
        text += f", {n} replacement{'s' * (n != 1)}"
    return text


def _result_slots(methods, clients, kinds: dict[str, str]) -> dict[tuple, int]:
    """(method, client, task, metric) -> index into the flat results tensor; the same on every
    rank."""
    keys = [
        (method, c.id, task, metric)
        for method in methods
        for c in clients
        for task in c.tasks
        for metric in METRICS[kinds[task]]
    ]
    return {key: i for i, key in enumerate(keys)}


def _results(slots: dict[tuple, int], values: list[float], kinds: dict[str, str]) -> dict:
    nested: dict = {}
    for (method, client, task, metric), i in slots.items():
        nested.setdefault(method, {}).setdefault(str(client), {}).setdefault(task, {})[metric] = (
            values[i]
        )
    return {
        method: {
            client: {task: task_entry(kinds[task], m) for task, m in tasks.items()}
            for client, tasks in per_client.items()
        }
        for method, per_client in nested.items()
    }
