"""Extra loss terms of local training: TAP's distillation and DisentAFL's orthogonality loss.

Distillation per task kind (the weight of each kind comes from the ``tap`` config section):

- classification: ``KL(softmax(z_T / T) || softmax(z_S / T)) * T^2`` over the batch;
- text generation: the same KL per answer position, averaged over non-padding positions only;
- image generation: the mean squared error between the student's and the teacher's images. A
  reconstruction head outputs pixel means, not a distribution; squared error to the teacher's
  output is the KL between two Gaussians of equal fixed variance, up to a constant factor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from tapdist.config import TapConfig
from tapdist.local import Extra, Joint


def kd_loss(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Distillation loss of one task's head output ``student`` towards ``teacher``."""
    student, teacher = student.float(), teacher.float()
    if kind == "image_gen":
        return F.mse_loss(student, teacher)
    if kind == "text_gen":
        keep = batch["answer"] != -100
        student, teacher = student[keep], teacher[keep]
        if student.numel() == 0:
            return student.sum()
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def distillation_term(
    kinds: Mapping[str, str], tap: TapConfig, targets: list[dict[str, torch.Tensor]]
) -> Extra:
    """The extra loss term of a student trained over the micro-batches the teacher's head
    outputs ``targets`` (one dict per micro-batch) were computed on."""

    def term(task, batch, out, paths, index):
        kind = kinds[task]
        weight = getattr(tap, f"kd_{kind}")
        return weight * kd_loss(kind, out, targets[index][task], batch, tap.kd_temperature)

    return term


def orthogonality_term(model, weight: float) -> Joint:
    """DisentAFL's loss: ``weight`` x the mean squared cosine similarity between the batch-mean
    mod-task latents of every two different (modality, task) groups of a micro-batch."""
    slots = model.mod_task_slots()  # task -> [(modality, index into the task's path features)]

    def term(paths: Mapping[str, torch.Tensor]) -> torch.Tensor:
        latents = [paths[t][:, i].float().mean(dim=0) for t in paths for _, i in slots[t]]
        if len(latents) < 2:
            return next(iter(paths.values())).new_zeros(())
        z = F.normalize(torch.stack(latents), dim=-1)
        cos = z @ z.T
        pairs = ~torch.eye(len(latents), dtype=torch.bool, device=z.device)
        return weight * cos[pairs].pow(2).mean()

    return term
