"""Local training of one model instance on one client's data.

Micro-batches mix the client's tasks in proportion to their data: the loss is the sum over tasks
of (share of the batch) x task loss. AdamW (weight decay 0.01), gradient clipping at 1.0, and a
fresh optimizer every round, as TAP prescribes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tapdist.config import TrainConfig
from tapdist.models.tap import TapModel

Data = Mapping[str, Mapping[str, torch.Tensor]]  # task -> field -> tensor (first dim: samples)


def train_locally(
    model: TapModel,
    names: list[str],
    state: Mapping[str, torch.Tensor],
    data: Data,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Load ``state`` (exactly ``names``), train ``cfg.local_steps`` steps, return the new state.

    All randomness (batches, dropout) derives from ``generator``, so the result does not depend
    on which process trains the client.
    """
    model.load_state(state, names)
    params = dict(model.named_parameters())
    trained = [params[n] for n in names]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.01)
    torch.manual_seed(generator.initial_seed())  # dropout draws from the global generator
    sizes = {task: len(fields["domain"]) for task, fields in data.items()}
    total = sum(sizes.values())
    shares = {task: size / total for task, size in sizes.items()}
    device = trained[0].device
    model.train()
    losses = []
    for _ in range(cfg.local_steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.accumulation):
            losses.append(_micro_batch(model, data, shares, cfg, generator, device))
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
    return model.get_state(names), {"loss": sum(losses) / len(losses)}


def _micro_batch(
    model: TapModel,
    data: Data,
    shares: dict[str, float],
    cfg: TrainConfig,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    """Backward of one micro-batch's loss (scaled for accumulation); returns its value."""
    value = 0.0
    for task, fields in data.items():
        share = shares[task]
        take = max(1, round(cfg.batch_size * share))
        rows = torch.randint(len(fields["domain"]), (take,), generator=generator)
        batch = model_inputs({k: v[rows] for k, v in fields.items()}, device)
        loss = model.loss(task, batch) * share
        (loss / cfg.accumulation).backward()
        value += loss.item()
    return value


def model_inputs(fields: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """A batch on ``device`` as the model reads it: uint8 images become floats in [0, 1]."""
    batch = {k: v.to(device, non_blocking=True) for k, v in fields.items()}
    if "image" in batch and batch["image"].dtype == torch.uint8:
        batch["image"] = batch["image"].float().div_(255.0)
    return batch
