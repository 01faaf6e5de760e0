"""Synthetic samples for a task: random but learnable, generated from the seed.

Classification images carry a class-dependent colour and pattern, classification texts a
class-dependent token; image generation reconstructs smooth random images; text generation
answers with the first tokens of its text. Enough signal for losses to fall, nothing to download.
"""

from __future__ import annotations

import numpy as np
import torch

from tapdist.models.heads import IMAGE_SIZE
from tapdist.models.tap import TaskSpec

RESERVED = 4  # token ids below this are special (0: padding)


def make_task_data(
    task: TaskSpec,
    samples: int,
    text_len: int,
    vocab: int,
    answer_len: int,
    domains: list[str],
    seed: tuple[int, ...],
) -> dict[str, torch.Tensor]:
    """Tensors for ``samples`` samples of ``task``: image (uint8), text, text_mask,
    label/answer, domain."""
    rng = np.random.default_rng(list(seed))
    label = rng.integers(0, max(task.classes, 1), samples)
    data: dict[str, torch.Tensor] = {}
    if "image" in task.modalities:
        pixels = np.round(_images(rng, samples, label, task) * 255).astype(np.uint8)
        data["image"] = torch.from_numpy(pixels)  # uint8, as stored; models read [0, 1] floats
    if "text" in task.modalities:
        ids, mask = _texts(rng, samples, text_len, vocab, label, task)
        data["text"], data["text_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
    if task.kind.endswith("_cls"):
        data["label"] = torch.from_numpy(label)
    if task.kind == "text_gen":  # answer: the text's first tokens, padded to answer_len
        source = (
            data["text"]
            if "text" in data
            else torch.from_numpy(rng.integers(RESERVED, vocab, (samples, answer_len)))
        )
        answer = torch.zeros(samples, answer_len, dtype=torch.long)
        width = min(answer_len, source.shape[1])
        answer[:, :width] = source[:, :width]
        answer[answer == 0] = -100  # padding does not count
        data["answer"] = answer
    local = [domains.index(d) for d in task.domains]
    data["domain"] = torch.tensor(rng.choice(local, samples), dtype=torch.long)
    return data


def _images(rng, n: int, label, task: TaskSpec) -> np.ndarray:
    size = IMAGE_SIZE
    if task.kind == "image_gen":  # smooth images: upsampled 8 x 8 noise
        small = rng.random((n, 3, 8, 8), dtype=np.float32)
        return np.repeat(np.repeat(small, size // 8, axis=2), size // 8, axis=3)
    colours = np.random.default_rng(len(task.name)).random((max(task.classes, 1), 3))
    img = rng.random((n, 3, size, size), dtype=np.float32) * 0.5
    img += 0.5 * colours[label][:, :, None, None].astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _texts(rng, n: int, length: int, vocab: int, label, task: TaskSpec):
    ids = rng.integers(RESERVED, vocab, (n, length))
    lengths = rng.integers(length // 2, length + 1, n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    if task.kind.endswith("_cls"):
        ids[:, 1] = RESERVED + label  # the class token
    ids = ids * mask
    return ids.astype(np.int64), mask
