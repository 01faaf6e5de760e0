"""FL algorithms as hook sets: the round loop is written once and calls these.

An algorithm decides what a sampled client does in a round with its copy of the global
sub-model (``client_round``: what it uploads, what it reports) and which models a client ends
with after the rounds (``finish``: method key -> state, each evaluated on the client's held-out
data). The model's forward never knows which algorithm runs. Per-client state that never leaves
the client (TAP's personal models, Local's models) lives in the algorithm instance of the rank
that hosts the client.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tapdist.config import Config, ConfigError
from tapdist.distill import distillation_term, orthogonality_term
from tapdist.local import plan, warmup_lr
from tapdist.models.base import FederatedModel, State
from tapdist.registry import ALGORITHMS


@dataclass
class ClientUpdate:
    """One client's round: the state it uploads and its metrics (named by metric_names)."""

    upload: State
    metrics: dict[str, float]


class Algorithm(ABC):
    """Hooks of one FL algorithm. The base class trains the global copy and uploads it."""

    #: the method key of this algorithm's own final model in results.json
    method = ""
    #: whether sampled clients upload their trained global copy for averaging
    uploads = True

    def __init__(self, cfg: Config, model: FederatedModel):
        self.cfg, self.model = cfg, model
        self.tasks = model.task_kinds()  # union tasks -> kind, in a fixed order

    @property
    def methods(self) -> tuple[str, ...]:
        """Method keys ``finish`` returns, in results order."""
        return (self.method,)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Per-client metrics of a round; they travel in the round's one collective."""
        return (*(f"global_loss.{t}" for t in self.tasks), "global_s")

    def client_round(
        self, client: int, global_sub: State, round_index: int, generator: torch.Generator
    ) -> ClientUpdate:
        """Run ``client``'s part of round ``round_index`` from its global sub-state."""
        trained, losses, seconds = self._train(client, global_sub, round_index, generator)
        return ClientUpdate(trained, {**_prefixed("global_loss", losses), "global_s": seconds})

    @abstractmethod
    def finish(self, client: int, global_sub: State, generator: torch.Generator) -> dict:
        """The client's final models after the rounds: method key -> state."""

    def round_summary(self, stats: dict[int, dict[str, float]]) -> dict:
        """Algorithm-specific fields of a round's metrics record (every rank sees ``stats``)."""
        return {}

    # --- what a checkpoint saves beyond the global state -----------------------------------

    def client_state(self, client: int) -> State:
        """The tensors this algorithm keeps for ``client`` between rounds (empty: none)."""
        return {}

    def load_client_state(self, client: int, state: State) -> None:
        """Restore what :meth:`client_state` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no client state; got {sorted(state)}")

    def state_dict(self) -> dict:
        """Small JSON-able state shared by every rank (identical on all of them)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no shared state; got {sorted(state)}")

    # --- shared steps -----------------------------------------------------------------------

    def _train(
        self,
        client: int,
        state: State,
        round_index: int,
        generator: torch.Generator,
        joint=None,
    ) -> tuple[State, dict[str, float], float]:
        """One round of local training of ``state`` at the round's learning rate."""
        m, train = self.model, self.cfg.train
        data = m.train_data(client)
        batches = plan(data, train.local_steps * train.accumulation, train.batch_size, generator)
        started = _now()
        lr = warmup_lr(train, round_index)
        trained, losses = m.trainer.train(
            m.client_keys(client), state, data, batches, lr, generator, joint=joint
        )
        return trained, losses, _now() - started

    def _finetune(
        self, client: int, state: State, generator: torch.Generator, scale: int = 1, **terms
    ) -> State:
        """Post-FL local fine-tuning: ``scale x tap.finetune_steps`` micro-batches at min_lr."""
        steps = self.cfg.tap.finetune_steps * scale
        if steps == 0:
            return state
        m = self.model
        data = m.train_data(client)
        batches = plan(data, steps, self.cfg.train.batch_size, generator)
        lr = self.cfg.train.min_lr
        tuned, _ = m.trainer.train(
            m.client_keys(client), state, data, batches, lr, generator, **terms
        )
        return tuned


@ALGORITHMS.register("fedavg")
class FedAvg(Algorithm):
    """Each sampled client trains its copy of the global sub-model and uploads it; yields the
    global model (``fedavg``) and the global model fine-tuned locally (``fedavg_ft``)."""

    method = "fedavg"

    @property
    def methods(self) -> tuple[str, ...]:
        return ("fedavg", "fedavg_ft")

    def finish(self, client: int, global_sub: State, generator: torch.Generator) -> dict:
        return {"fedavg": global_sub, "fedavg_ft": self._finetune(client, global_sub, generator)}


@ALGORITHMS.register("local")
class Local(Algorithm):
    """Each client trains its own model alone when sampled; nothing is uploaded or averaged. The
    final model is fine-tuned like every other method's (same local compute)."""

    method = "local"
    uploads = False

    def __init__(self, cfg: Config, model: FederatedModel):
        super().__init__(cfg, model)
        self.own: dict[int, State] = {}

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (*(f"local_loss.{t}" for t in self.tasks), "local_s")

    def client_round(self, client, global_sub, round_index, generator) -> ClientUpdate:
        state = self.own.get(client, global_sub)  # round-0 global state = the initial model
        own, losses, seconds = self._train(client, state, round_index, generator)
        self.own[client] = kept(own)
        return ClientUpdate({}, {**_prefixed("local_loss", losses), "local_s": seconds})

    def client_state(self, client: int) -> State:
        return _prefixed("own", self.own[client]) if client in self.own else {}

    def load_client_state(self, client: int, state: State) -> None:
        if state:
            self.own[client] = _unprefixed("own", state)

    def finish(self, client: int, global_sub: State, generator: torch.Generator) -> dict:
        own = self.own.get(client, self.model.initial_substate(client))
        return {"local": self._finetune(client, own, generator)}


@ALGORITHMS.register("disentafl")
class DisentAFL(Algorithm):
    """FedAvg with an orthogonality loss between the mod-task latents of different (modality,
    task) groups of a micro-batch, then local fine-tuning with the same loss."""

    method = "disentafl"

    def __init__(self, cfg: Config, model: FederatedModel):
        super().__init__(cfg, model)
        self.joint = orthogonality_term(model, cfg.tap.disentafl_weight)

    def client_round(self, client, global_sub, round_index, generator) -> ClientUpdate:
        trained, losses, seconds = self._train(
            client, global_sub, round_index, generator, joint=self.joint
        )
        return ClientUpdate(trained, {**_prefixed("global_loss", losses), "global_s": seconds})

    def finish(self, client: int, global_sub: State, generator: torch.Generator) -> dict:
        return {"disentafl": self._finetune(client, global_sub, generator, joint=self.joint)}


ABLATIONS = {"no_distillation": "tap_no_kd", "double_finetune": "tap_ft2x"}


@ALGORITHMS.register("tap")
class TAP(Algorithm):
    """TAP (see docs/tap.md). Stage 1, per sampled client: train the global copy; for each task
    whose global loss beats the personal model's by the task kind's margin, copy the task's
    components into the personal model; train the personal model; upload the global copy.
    Stage 2 (``finish``): the teacher is the global sub-model fine-tuned locally (also the
    FedAvg+FT baseline), the student the personal model trained on its task loss plus
    distillation from the teacher; the student is the TAP model."""

    method = "tap"

    def __init__(self, cfg: Config, model: FederatedModel):
        super().__init__(cfg, model)
        unknown = [a for a in cfg.tap.ablations if a not in ABLATIONS]
        if unknown:
            raise ConfigError(
                f"tap.ablations = {cfg.tap.ablations}: unknown {unknown}; "
                f"accepted: {', '.join(ABLATIONS)}"
            )
        self.personal: dict[int, State] = {}
        self.personal_loss: dict[int, dict[str, float]] = {}  # for the stale rule
        self.replacements = dict.fromkeys(sorted(set(self.tasks.values())), 0)

    @property
    def methods(self) -> tuple[str, ...]:
        extra = tuple(ABLATIONS[a] for a in self.cfg.tap.ablations)
        return ("tap", "fedavg", "fedavg_ft", *extra)

    @property
    def metric_names(self) -> tuple[str, ...]:
        per_task = [
            f"{what}.{t}"
            for what in ("global_loss", "personal_loss", "replaced")
            for t in self.tasks
        ]
        return (*per_task, "global_s", "replace_s", "personal_s")

    def client_round(self, client, global_sub, round_index, generator) -> ClientUpdate:
        trained, g_loss, g_seconds = self._train(client, global_sub, round_index, generator)
        started = _now()
        personal = self.personal.get(client)
        if personal is None:
            personal = self.model.initial_substate(client)
        replaced = self._replace(client, trained, personal, g_loss, generator)
        r_seconds = _now() - started
        personal, p_loss, p_seconds = self._train(client, personal, round_index, generator)
        self.personal[client], self.personal_loss[client] = kept(personal), p_loss
        metrics = {
            **_prefixed("global_loss", g_loss),
            **_prefixed("personal_loss", p_loss),
            **_prefixed("replaced", {t: float(t in replaced) for t in g_loss}),
            "global_s": g_seconds,
            "replace_s": r_seconds,
            "personal_s": p_seconds,
        }
        return ClientUpdate(trained, metrics)

    def _replace(
        self,
        client: int,
        trained: State,
        personal: State,
        train_loss: dict[str, float],
        generator: torch.Generator,
    ) -> list[str]:
        """Copy into ``personal`` (in place) the components of each task whose global loss
        beats the personal loss by the task kind's margin; returns those tasks."""
        g_loss, p_loss = self._losses(client, trained, personal, train_loss, generator)
        replaced = []
        for task, loss in g_loss.items():
            if loss + self.margin(task) < p_loss[task]:
                for key in self.model.task_keys(client, task):
                    personal[key] = trained[key].clone()
                replaced.append(task)
        return replaced

    def _losses(self, client, trained, personal, train_loss, generator):
        """(global, personal) loss per task under the configured replacement rule. A client's
        first selection has no personal loss yet (+inf), so it always replaces."""
        if self.cfg.tap.replacement_rule == "stale":
            previous = self.personal_loss.get(client, {})
            return train_loss, {t: previous.get(t, math.inf) for t in train_loss}
        if client not in self.personal_loss:
            return train_loss, dict.fromkeys(train_loss, math.inf)
        m = self.model
        data = m.train_data(client)
        batches = plan(data, self.cfg.tap.compare_batches, self.cfg.train.batch_size, generator)
        names = m.client_keys(client)
        return m.trainer.score(names, trained, data, batches), m.trainer.score(
            names, personal, data, batches
        )

    def client_state(self, client: int) -> State:
        if client not in self.personal:
            return {}
        losses = {
            t: torch.tensor(v, dtype=torch.float64) for t, v in self.personal_loss[client].items()
        }
        return {**_prefixed("personal", self.personal[client]), **_prefixed("loss", losses)}

    def load_client_state(self, client: int, state: State) -> None:
        if state:
            self.personal[client] = _unprefixed("personal", state)
            self.personal_loss[client] = {
                t: float(v) for t, v in _unprefixed("loss", state).items()
            }

    def state_dict(self) -> dict:
        return {"replacements": dict(self.replacements)}

    def load_state_dict(self, state: dict) -> None:
        self.replacements.update(state.get("replacements", {}))

    def margin(self, task: str) -> float:
        return getattr(self.cfg.tap, f"margin_{self.tasks[task]}")

    def round_summary(self, stats: dict[int, dict[str, float]]) -> dict:
        now = dict.fromkeys(self.replacements, 0)
        for row in stats.values():
            for task, kind in self.tasks.items():
                now[kind] += int(round(row.get(f"replaced.{task}", 0.0)))
        for kind, n in now.items():
            self.replacements[kind] += n
        return {"replacements": now, "replacements_cumulative": dict(self.replacements)}

    def finish(self, client: int, global_sub: State, generator: torch.Generator) -> dict:
        """Stage 2: fine-tune the teacher, distil the student on the same micro-batches."""
        m, tap = self.model, self.cfg.tap
        personal = self.personal.get(client)
        if personal is None:  # never sampled: the initial model
            personal = m.initial_substate(client)
        teacher, student = global_sub, personal
        if tap.finetune_steps > 0:
            names, data = m.client_keys(client), m.train_data(client)
            batches = plan(data, tap.finetune_steps, self.cfg.train.batch_size, generator)
            lr = self.cfg.train.min_lr
            teacher, _ = m.trainer.train(names, global_sub, data, batches, lr, generator)
            targets = m.trainer.outputs(names, teacher, data, batches)
            kd = distillation_term(self.tasks, tap, targets)
            student, _ = m.trainer.train(names, personal, data, batches, lr, generator, extra=kd)
        ablations = {
            ABLATIONS[a]: self._finetune(
                client, personal, generator, 2 if a == "double_finetune" else 1
            )
            for a in tap.ablations
        }
        return {"tap": student, "fedavg": global_sub, "fedavg_ft": teacher, **ablations}


def kept(state: State) -> State:
    """A client's state to keep between rounds, in host memory: a rank's device holds one
    client's tensors at a time, however many clients it hosts."""
    return {k: v.cpu() for k, v in state.items()}


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def _unprefixed(prefix: str, values: dict) -> dict:
    head = prefix + "."
    return {k[len(head) :]: v for k, v in values.items() if k.startswith(head)}


def _now() -> float:
    return time.perf_counter()
