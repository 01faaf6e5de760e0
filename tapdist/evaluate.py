"""Held-out evaluation: every task's metrics as exact averages over its samples or tokens.

Batches run in order with the model in eval mode; each batch adds (total, count) pairs, and a
metric is the sum of its totals over the sum of its counts, so the result does not depend on the
batch size. Text generation scores the argmax id at every answer position against the reference
ids; positions where the reference is padding (-100) are dropped from both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tapdist.local import model_inputs

IGNORE = -100  # the answer label of a padding position

# Per task kind: the metrics reported, and the primary one with its direction. Text generation
# ranks by token cross-entropy: its mean over tasks is the log of the geometric-mean perplexity,
# where an arithmetic mean of perplexities would be decided by the task with the largest one.
METRICS: dict[str, tuple[str, ...]] = {
    "image_cls": ("accuracy", "loss"),
    "text_cls": ("accuracy", "loss"),
    "image_gen": ("mse",),
    "text_gen": ("token_ce", "perplexity", "token_f1", "rouge_l", "exact_match"),
}
PRIMARY: dict[str, tuple[str, str]] = {
    "image_cls": ("accuracy", "max"),
    "text_cls": ("accuracy", "max"),
    "image_gen": ("mse", "min"),
    "text_gen": ("token_ce", "min"),
}

Ids = Sequence[int] | torch.Tensor
Sums = dict[str, tuple[float, float]]  # metric -> (total, count) of one batch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tasks: Iterable[str],
    data: Mapping[str, Mapping[str, torch.Tensor]],
    batch_size: int,
    device: torch.device | str,
) -> dict[str, dict[str, float]]:
    """task -> metric -> value on held-out data (``data[task][field]``: first dim samples,
    images uint8). The model runs in eval mode; every module's mode is restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        return {
            task: _evaluate_task(model, task, data, batch_size, torch.device(device))
            for task in tasks
        }
    finally:
        for module, mode in modes.items():  # flags as they were, submodule by submodule
            module.training = mode


def _evaluate_task(
    model: nn.Module,
    task: str,
    data: Mapping[str, Mapping[str, torch.Tensor]],
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    fields = data.get(task, {})
    samples = _num_samples(task, fields)
    kind = model.tasks[task].kind
    totals: dict[str, list[float]] = {}
    for start in range(0, samples, batch_size):
        rows = {k: v[start : start + batch_size] for k, v in fields.items()}
        batch = model_inputs(rows, device)
        out, _ = model(task, batch)
        for metric, (total, count) in _SCORERS[kind](out, batch).items():
            acc = totals.setdefault(metric, [0.0, 0.0])
            acc[0] += total
            acc[1] += count
    return _finish(kind, totals)


def _num_samples(task: str, fields: Mapping[str, torch.Tensor]) -> int:
    sizes = {name: len(tensor) for name, tensor in fields.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"task '{task}': held-out fields differ in length: {sizes}")
    samples = next(iter(sizes.values()), 0)
    if samples == 0:
        raise ValueError(f"task '{task}': the held-out split is empty")
    return samples


def _finish(kind: str, totals: dict[str, list[float]]) -> dict[str, float]:
    means = {m: total / count if count else math.nan for m, (total, count) in totals.items()}
    if kind == "text_gen":
        means["perplexity"] = _exp(means["token_ce"])
    return {m: means[m] for m in METRICS[kind]}


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# --- per-batch sums -----------------------------------------------------------------------------


def _classification(out: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> Sums:
    logits, label = out.float(), batch["label"]
    n = float(len(label))
    loss = F.cross_entropy(logits, label, reduction="none").double().sum()
    correct = (logits.argmax(-1) == label).sum()
    return {"accuracy": (correct.item(), n), "loss": (loss.item(), n)}


def _image_generation(out: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> Sums:
    error = (out.double() - batch["image"].double()).square().sum()
    return {"mse": (error.item(), float(out.numel()))}


def _text_generation(out: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> Sums:
    logits, answer = out.float(), batch["answer"]
    ce = F.cross_entropy(
        logits.flatten(0, 1), answer.flatten(), ignore_index=IGNORE, reduction="none"
    )
    tokens = (answer != IGNORE).sum()
    n = float(len(answer))
    scores = answer_scores(logits.argmax(-1), answer)
    return {
        "token_ce": (ce.double().sum().item(), tokens.item()),
        **{metric: (value.sum().item(), n) for metric, value in scores.items()},
    }


_SCORERS: dict[str, Callable[[torch.Tensor, Mapping[str, torch.Tensor]], Sums]] = {
    "image_cls": _classification,
    "text_cls": _classification,
    "image_gen": _image_generation,
    "text_gen": _text_generation,
}


# --- overlap scores -----------------------------------------------------------------------------


def token_f1(pred: Ids, ref: Ids) -> float:
    """SQuAD-style F1 of the bags of tokens; 1.0 when both are empty, 0.0 when one is."""
    pred, ref = _ids(pred), _ids(ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    return _f_measure(common, len(pred), len(ref))


def rouge_l(pred: Ids, ref: Ids) -> float:
    """ROUGE-L F-measure (beta = 1) from the longest common subsequence of two id sequences."""
    pred, ref = _ids(pred), _ids(ref)
    row = [0] * (len(ref) + 1)
    for p in pred:
        prev, row = row, [0]
        for j, r in enumerate(ref):
            row.append(prev[j] + 1 if p == r else max(prev[j + 1], row[j]))
    return _f_measure(row[-1], len(pred), len(ref))


def exact_match(pred: Ids, ref: Ids) -> float:
    """1.0 when the two id sequences are equal, else 0.0."""
    return float(_ids(pred) == _ids(ref))


def answer_scores(pred: torch.Tensor, answer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample ``token_f1``, ``rouge_l`` and ``exact_match`` (float64, shape (B,)) of
    predicted ids (B, L) against answers (B, L), over each answer's non-padding positions."""
    pred, answer = pred.cpu(), answer.cpu()
    valid = answer != IGNORE
    length = valid.sum(1)
    # same[b, i, j]: predicted id i equals reference id j, both at kept positions
    same = (pred[:, :, None] == answer[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return {
        "token_f1": _batch_f_measure(_bag_overlap(pred, valid, same), length),
        "rouge_l": _batch_f_measure(_lcs_length(same), length),
        "exact_match": ((pred == answer) | ~valid).all(1).double(),
    }


def _bag_overlap(pred: torch.Tensor, valid: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Size of the multiset intersection: the k-th occurrence of an id in the prediction
    matches when the reference holds that id more than k times."""
    length = pred.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool).tril(-1)  # [i, j]: j < i
    repeats = (pred[:, :, None] == pred[:, None, :]) & valid[:, None, :] & earlier
    matched = valid & (repeats.sum(2) < same.sum(2))
    return matched.sum(1)


def _lcs_length(same: torch.Tensor) -> torch.Tensor:
    """LCS lengths from a (B, L, M) match grid, one DP row per prediction id, batched.

    The usual recurrence, cell = match ? above-left + 1 : max(above, left), equals the running
    maximum along the row of (match ? above-left + 1 : above), because no cell exceeds its
    left or above neighbour by more than one."""
    batch, _, width = same.shape
    zero = torch.zeros(batch, 1, dtype=torch.long)
    row = torch.zeros(batch, width + 1, dtype=torch.long)
    for matches in same.unbind(1):
        candidate = torch.where(matches, row[:, :-1] + 1, row[:, 1:])
        row = torch.cat([zero, candidate.cummax(1).values], 1)
    return row[:, -1]


def _f_measure(overlap: int, n_pred: int, n_ref: int) -> float:
    # 2PR / (P + R) with P = overlap / n_pred and R = overlap / n_ref
    return 1.0 if n_pred + n_ref == 0 else 2.0 * overlap / (n_pred + n_ref)


def _batch_f_measure(overlap: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    # prediction and reference keep the same positions, so both have ``length`` ids
    total = (2 * length).double()
    return torch.where(total == 0, 1.0, 2.0 * overlap.double() / total.clamp_min(1.0))


def _ids(x: Ids) -> list[int]:
    return x.flatten().tolist() if isinstance(x, torch.Tensor) else [int(i) for i in x]
