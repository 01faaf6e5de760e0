"""Local training of one model instance (a trainable state) on one client's data.

A client-round runs a fixed number of micro-batches for every client, whatever its data size (a
small dataset is cycled). The plan of a round, which rows of which task each micro-batch holds, is
drawn up front from the round's generator as index tensors: every task contributes its share of
the batch (by data size), and each task's rows are ordered by domain so MoDE routes contiguous
groups. The loss of a micro-batch is the sum over tasks of (share x task loss), plus optional
extra terms (distillation, DisentAFL's orthogonality loss). AdamW with a fresh state every round,
gradient-norm clipping, bf16 autocast on CUDA (the frozen weights read in bf16 copies made once,
:class:`~tapdist.models.backbone.MatmulWeights`). On CUDA a micro-batch whose routing is fixed is
captured as a CUDA graph the first time its shapes appear and replayed after
(:mod:`tapdist.graphs`): the same computation, one launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tapdist.config import TrainConfig
from tapdist.graphs import StepGraphs
from tapdist.models.backbone import MatmulWeights
from tapdist.models.layers import Runs, domain_runs
from tapdist.models.tap import TapModel

Fields = Mapping[str, torch.Tensor]  # field -> tensor (first dim: samples)
Data = Mapping[str, Fields]  # task -> fields
#: extra(task, batch, head_output, paths, micro_batch_index) -> loss term added to the task's
Extra = Callable[[str, Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor, int], torch.Tensor]
#: joint(paths per task of one micro-batch) -> loss term added once per micro-batch
Joint = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Plan:
    """Rows of each task for every micro-batch: ``rows[task]`` is (micro-batches, take), and
    ``runs[task][i]`` the domain runs of micro-batch ``i`` (known on the host, so MoDE routing
    never waits for the device)."""

    rows: dict[str, torch.Tensor]
    shares: dict[str, float]
    runs: dict[str, list[Runs]]

    @property
    def length(self) -> int:
        return next(iter(self.rows.values())).shape[0]

    def to(self, device: torch.device) -> Plan:
        rows = {task: r.to(device, non_blocking=True) for task, r in self.rows.items()}
        return Plan(rows, self.shares, self.runs)

    def batch(self, data: Data, task: str, index: int, device: torch.device) -> dict:
        """Micro-batch ``index`` of ``task``, gathered where ``data`` lives, on ``device``."""
        rows = self.rows[task][index]
        batch = model_inputs({k: v[rows] for k, v in data[task].items()}, device)
        batch["domain_runs"] = self.runs[task][index]
        return batch


def plan(data: Data, micro_batches: int, batch_size: int, generator: torch.Generator) -> Plan:
    """Draw ``micro_batches`` micro-batches from ``data``: epochs of seeded permutations per task,
    each task taking its share of ``batch_size`` (at least one row), rows ordered by domain."""
    sizes = {task: len(fields["domain"]) for task, fields in data.items()}
    total = sum(sizes.values())
    shares = {task: size / total for task, size in sizes.items()}
    rows, runs = {}, {}
    for task, size in sizes.items():
        take = max(1, round(batch_size * shares[task]))
        need = take * micro_batches
        epochs = [torch.randperm(size, generator=generator) for _ in range(-(-need // size))]
        drawn = torch.cat(epochs)[:need].view(micro_batches, take)
        domains = data[task]["domain"].cpu()[drawn]
        order = domains.argsort(dim=1, stable=True)
        rows[task] = drawn.gather(1, order)
        runs[task] = [domain_runs(d) for d in domains.gather(1, order)]
    return Plan(rows, shares, runs)


class LocalTrainer:
    """Trains and scores states of one resident :class:`TapModel` on a device."""

    def __init__(self, model: TapModel, cfg: TrainConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.autocast = bf16
        self.weights = MatmulWeights(model, torch.bfloat16) if bf16 else None
        graphs = cfg.cuda_graphs == "auto" and self.device.type == "cuda"
        self.graphs = StepGraphs(self.device) if graphs else None
        self._streams: list[torch.cuda.Stream] = []  # the tasks' lanes in a captured step
        self._resident: tuple[Data, Data] | None = None  # (host data, its copy on the device)

    def train(
        self,
        names: list[str],
        state: Mapping[str, torch.Tensor],
        data: Data,
        batches: Plan,
        lr: float,
        generator: torch.Generator,
        extra: Extra | None = None,
        joint: Joint | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Train from ``state`` (exactly ``names``) over ``batches``; return the new state and
        the mean task loss per task. Dropout draws from ``generator``'s seed, so the result does
        not depend on which process trains the client."""
        model, cfg = self.model, self.cfg
        data, batches = self._on_device(data, batches)
        model.load_state(state, names)
        trained = model.trainable_parameters(names)
        fused = self.device.type == "cuda"  # one kernel for the whole update
        optimizer = torch.optim.AdamW(  # elsewhere one operator per step over every tensor
            trained, lr=lr, weight_decay=cfg.weight_decay, fused=fused, foreach=not fused
        )
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        sums = torch.zeros(len(batches.rows), device=self.device)
        model.train()
        with self.computing():
            for index in range(batches.length):
                if index % cfg.accumulation == 0:
                    optimizer.zero_grad(set_to_none=True)
                sums += self._step(data, batches, index, trained, extra, joint)
                last = index + 1 == batches.length
                if (index + 1) % cfg.accumulation == 0 or last:
                    group = index % cfg.accumulation + 1
                    if group < cfg.accumulation:  # a last, short group: the mean over its own
                        grads = [p.grad for p in trained if p.grad is not None]
                        torch._foreach_mul_(grads, cfg.accumulation / group)
                    if cfg.clip_norm > 0:
                        torch.nn.utils.clip_grad_norm_(trained, cfg.clip_norm)
                    optimizer.step()
        means = (sums / batches.length).tolist()
        return model.get_state(names), dict(zip(batches.rows, means))

    @torch.no_grad()
    def score(
        self, names: list[str], state: Mapping[str, torch.Tensor], data: Data, batches: Plan
    ) -> dict[str, float]:
        """Mean task loss per task of ``state`` over ``batches`` (eval mode, no training)."""
        data, batches = self._on_device(data, batches)
        self.model.load_state(state, names)
        self.model.eval()
        sums = torch.zeros(len(batches.rows), device=self.device)
        with self.computing():
            for index in range(batches.length):
                sums += self._step(data, batches, index, [])
        return dict(zip(batches.rows, (sums / batches.length).tolist()))

    @torch.no_grad()
    def outputs(
        self, names: list[str], state: Mapping[str, torch.Tensor], data: Data, batches: Plan
    ) -> list[dict[str, torch.Tensor]]:
        """Head outputs of ``state`` per micro-batch and task (eval mode): a teacher's targets."""
        data, batches = self._on_device(data, batches)
        self.model.load_state(state, names)
        self.model.eval()
        out = []
        with self.computing():
            for index in range(batches.length):
                micro = self._inputs(data, batches, index)
                with self._precision():
                    out.append(
                        {task: self.model(task, b)[0].float().detach() for task, b in micro.items()}
                    )
        return out

    def computing(self):
        """While the trainer computes: in bf16, the frozen weights swapped for their bf16
        copies (autocast would cast each at every use); the fp32 originals stay for the rest."""
        return self.weights.swapped_in() if self.weights else contextlib.nullcontext()

    def _on_device(self, data: Data, batches: Plan) -> tuple[Data, Plan]:
        """``data`` and the plan's index tensors on the device. A client's data is copied once
        and kept while the same client trains and scores (one client's data at a time, so
        device memory does not grow with the clients a rank hosts)."""
        if self.device.type == "cpu":
            return data, batches
        if self._resident is None or self._resident[0] is not data:
            moved = {
                task: {k: v.to(self.device, non_blocking=True) for k, v in fields.items()}
                for task, fields in data.items()
            }
            self._resident = (data, moved)
        return self._resident[1], batches.to(self.device)

    def _step(
        self,
        data: Data,
        batches: Plan,
        index: int,
        trained: list[torch.nn.Parameter],
        extra: Extra | None = None,
        joint: Joint | None = None,
    ) -> torch.Tensor:
        """Micro-batch ``index``'s task losses; with ``trained`` parameters also its backward,
        the gradients added to their ``.grad``. Replayed from a CUDA graph where its routing is
        fixed (the tasks then run side by side, on a stream each)."""
        micro = self._inputs(data, batches, index)
        divisor = self.cfg.accumulation
        fixed = self.graphs is not None and extra is None and joint is None
        key = _graph_key(batches, index, micro) if fixed else None
        if key is not None:
            lanes = self._lanes(len(micro))

            def forward(inputs):  # autocast's weight cache would outlive the capture
                return self._forward(inputs, batches.shares, None, None, index, False, lanes)

            key = (self.model.training, key)
            task_losses = self.graphs.step(key, micro, forward, trained, divisor)
            if task_losses is not None:
                return task_losses
        loss, task_losses = self._forward(micro, batches.shares, extra, joint, index)
        if trained:
            (loss / divisor).backward()
        return task_losses

    def _lanes(self, tasks: int) -> list[torch.cuda.Stream] | None:
        """A CUDA stream per task of a micro-batch (none for one task): tasks are independent
        until their losses meet, so their small kernels can share the device."""
        if tasks < 2 or self.device.type != "cuda":
            return None
        while len(self._streams) < tasks:
            self._streams.append(torch.cuda.Stream(self.device))
        return self._streams[:tasks]

    def _inputs(self, data: Data, batches: Plan, index: int) -> dict[str, dict]:
        """Micro-batch ``index`` of every task, on the device."""
        return {task: batches.batch(data, task, index, self.device) for task in batches.rows}

    def _micro_batch(
        self, data: Data, batches: Plan, index: int, extra: Extra | None, joint: Joint | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's loss and its (detached) task losses, in task order."""
        micro = self._inputs(data, batches, index)
        return self._forward(micro, batches.shares, extra, joint, index)

    def _forward(
        self,
        micro: Mapping[str, dict],
        shares: Mapping[str, float],
        extra: Extra | None,
        joint: Joint | None,
        index: int,
        cache: bool = True,
        lanes: list[torch.cuda.Stream] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of prepared inputs ``micro`` (task -> batch) and the (detached) task
        losses, in task order. With ``lanes``, task i's forward runs on stream i (and so does
        its backward: autograd runs each backward operator on its forward's stream)."""
        model, outs, paths, losses = self.model, {}, {}, {}
        main = torch.cuda.current_stream(self.device) if lanes else None
        with self._precision(cache):
            for i, task in enumerate(shares):
                with _lane(lanes[i] if lanes else None, main):
                    batch = micro[task]
                    outs[task], paths[task] = model(task, batch)
                    losses[task] = model.heads[task].loss(outs[task], batch).float()
            for stream, loss in zip(lanes or [], losses.values()):
                main.wait_stream(stream)
                loss.record_stream(main)
            total, task_losses = 0.0, []
            for task, share in shares.items():
                loss = losses[task]
                task_losses.append(loss.detach())
                if extra is not None:
                    loss = loss + extra(task, micro[task], outs[task], paths[task], index)
                total = total + share * loss
            if joint is not None:
                total = total + joint(paths)
        return total, torch.stack(task_losses)

    def _precision(self, cache: bool = True):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache)


@contextlib.contextmanager
def _lane(stream: torch.cuda.Stream | None, main: torch.cuda.Stream | None):
    """Run the block on ``stream`` after what ``main`` has queued (no stream: in place)."""
    if stream is None:
        yield
        return
    stream.wait_stream(main)
    with torch.cuda.stream(stream):
        yield


def _graph_key(batches: Plan, index: int, micro: Mapping[str, dict]) -> tuple | None:
    """What fixes the computation of micro-batch ``index``: each task's share, domain routing
    and input shapes. None where a task's samples span several domains (routing that varies
    from micro-batch to micro-batch is not worth a graph each)."""
    key = []
    for task, batch in micro.items():
        runs = batches.runs[task][index]
        if len(runs) != 1:
            return None
        shapes = tuple(
            (k, tuple(v.shape), v.dtype) for k, v in batch.items() if isinstance(v, torch.Tensor)
        )
        key.append((task, batches.shares[task], runs, shapes))
    return tuple(key)


def warmup_lr(cfg: TrainConfig, round_index: int) -> float:
    """The learning rate of round ``round_index``: linear from min_lr to lr over warmup_rounds."""
    if cfg.warmup_rounds == 0:
        return cfg.lr
    progress = min(1.0, round_index / cfg.warmup_rounds)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * progress


def model_inputs(fields: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """A batch on ``device`` as the model reads it: uint8 images become floats in [0, 1]."""
    batch = {k: v.to(device, non_blocking=True) for k, v in fields.items()}
    if "image" in batch and batch["image"].dtype == torch.uint8:
        batch["image"] = batch["image"].float().div_(255.0)
    return batch
