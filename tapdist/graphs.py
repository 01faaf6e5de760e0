"""CUDA graphs of training micro-batches: a micro-batch's forward and backward, captured once per
shape and replayed with one launch.

A micro-batch of a large model runs thousands of small kernels (attention over 40-256 tokens,
LoRA factors of rank 4-16), so on a GPU the host launching them decides the speed, not the
arithmetic. Everything a micro-batch of a task set runs is fixed by its shapes and its domain
routing, and the parameters live at fixed addresses in the resident model, so the whole forward
and backward can be captured as a CUDA graph and replayed.

The graph computes what the eager step computes, with the same kernels: the same forward
function, the gradients of the same loss (``torch.autograd.grad`` into static buffers, added to
``.grad`` afterwards as the eager backward's accumulation does), and the same random stream (a
replay draws dropout from the generator's current seed and offset and advances it as the eager
kernels would; capturing leaves the generator as it found it). One difference under bf16
autocast: its cache of trainable weights cast to bf16 cannot outlive a capture, so a captured
step casts a trainable weight for each use, and the gradients of a weight used several times
meet in fp32 instead of bf16 (a difference of a bf16 rounding). Frozen weights are read from
bf16 copies either way. Only micro-batches whose routing is fixed are captured:
every task's samples of one domain, no extra loss terms. Anything else runs eagerly.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

#: Forward of prepared inputs: (loss to differentiate, detached task losses).
Forward = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly on the static buffers (CPU checks)
    inputs: list[torch.Tensor]  # static input buffers, in the order of _tensors()
    task_losses: torch.Tensor
    grads: list[torch.Tensor]
    step: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]


class StepGraphs:
    """Captured micro-batch steps of one trainer, keyed by what fixes a capture.

    ``capacity`` graphs are kept (least recently used goes first); they share one memory pool,
    which is safe because replays never overlap and each graph writes every buffer it reads
    before reading it. On a CPU device nothing is captured and a "replay" runs the step eagerly
    on the same static buffers, which lets the bookkeeping be tested without a GPU.
    """

    def __init__(self, device: torch.device, capacity: int = 8, warmup: int = 2):
        self.device, self.capacity, self.warmup = torch.device(device), capacity, warmup
        self.capture = self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._eager: set[Hashable] = set()  # keys that cannot be captured (no gradient path)
        self.captures = self.replays = 0

    def step(
        self,
        key: Hashable,
        inputs: dict,
        forward: Forward,
        params: Sequence[torch.nn.Parameter],
        divisor: int,
    ) -> torch.Tensor | None:
        """Run the micro-batch of ``inputs`` (task -> batch): its task losses, with the gradients
        of ``loss / divisor`` added to ``params``' ``.grad`` (no backward without ``params``).
        None when this key cannot be captured; the caller then runs it eagerly."""
        key = (key, divisor, tuple(map(id, params)))  # a graph writes these parameters' grads
        if key in self._eager:
            return None
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(inputs, forward, params, divisor)
            if captured is None:
                self._eager.add(key)
                return None
            self._graphs[key] = captured
            while len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        torch._foreach_copy_(captured.inputs, _tensors(inputs))
        if captured.graph is None:
            captured.task_losses, captured.grads = captured.step()
        else:
            captured.graph.replay()
        self.replays += 1
        _accumulate(params, captured.grads)
        return captured.task_losses

    def _capture(self, inputs, forward: Forward, params, divisor: int) -> _Captured | None:
        static = _clone(inputs)
        params = list(params)

        def step():
            loss, task_losses = forward(static)
            if not params:  # a forward only (scoring)
                return task_losses, []
            grads = torch.autograd.grad(loss / divisor, params, allow_unused=True)
            return task_losses, [_laid_out_as(g, p) for g, p in zip(grads, params)]

        if not self.capture:  # find the unused parameters, leaving the random stream as it was
            rng = torch.get_rng_state()
            task_losses, grads = step()
            torch.set_rng_state(rng)
            if any(g is None for g in grads):
                return None
            return _Captured(None, _tensors(static), task_losses, grads, step)
        rng = torch.cuda.get_rng_state(self.device)
        try:
            with warnings.catch_warnings():
                # a parameter two tasks share gets gradients from both tasks' streams; autograd
                # warns of the event it waits on, which the graph records once
                warnings.filterwarnings("ignore", "The AccumulateGrad node's stream does not match")
                return self._record(static, step)
        finally:
            torch.cuda.set_rng_state(rng, self.device)  # as if warmup and capture never ran

    def _record(self, static: dict, step) -> _Captured | None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # first runs: lazy initialisation, kept out of the graph
            for _ in range(self.warmup):
                task_losses, grads = step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if any(g is None for g in grads):
            return None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                task_losses, grads = step()
        except RuntimeError as error:  # an operation that cannot be captured (a host sync)
            warnings.warn(
                f"a micro-batch could not be captured as a CUDA graph and runs eagerly: {error}",
                stacklevel=4,
            )
            return None
        self.captures += 1
        return _Captured(graph, _tensors(static), task_losses, grads, step)


def _laid_out_as(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor | None:
    """``grad`` with ``param``'s strides, as the eager backward stores a ``.grad`` (the fused
    optimizers need it). tapdist's own layers return their gradients laid out already (a
    stacked LoRA's is made contiguous once per stack); this copies any other layer's."""
    if grad is None or grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


def _tensors(inputs: dict) -> list[torch.Tensor]:
    return [v for batch in inputs.values() for v in batch.values() if isinstance(v, torch.Tensor)]


def _clone(inputs: dict) -> dict:
    return {
        task: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        for task, batch in inputs.items()
    }


def _accumulate(params: Sequence[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    """``.grad += grad`` as the eager backward does: a missing ``.grad`` takes a copy."""
    fresh = [i for i, p in enumerate(params) if p.grad is None]
    held = [i for i, p in enumerate(params) if p.grad is not None]
    if fresh:
        copies = torch._foreach_mul([grads[i] for i in fresh], 1.0)  # exact copies, one launch
        for i, copy in zip(fresh, copies):
            params[i].grad = copy
    if held:
        torch._foreach_add_([params[i].grad for i in held], [grads[i] for i in held])
