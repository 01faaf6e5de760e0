"""Synthetic samples for a task: random but learnable, generated from the seed.

Classification images carry a class-dependent colour and pattern, classification texts a
class-dependent token; image generation reconstructs smooth random images; text generation
answers with the first tokens of its text. Enough signal for losses to fall, nothing to download.

:func:`make_task_data` serves the in-memory ``data.source: synthetic`` path; :func:`make_items`
serves the ``synthetic`` source of ``tapdist data build``, whose image+text tasks need both inputs.
"""

from __future__ import annotations

import zlib

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
    lengths = rng.integers(max(2, length // 2), length + 1, n)  # [CLS] and the class token
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    if task.kind.endswith("_cls"):
        ids[:, 1] = RESERVED + label  # the class token
    ids = ids * mask
    return ids.astype(np.int64), mask


# --- the `synthetic` source of federation builds ---------------------------------------------

ANSWER_WORDS = 10  # text generation answers one of this many words


def item_targets(task: TaskSpec, ids: np.ndarray) -> np.ndarray | None:
    """The class (classification) or answer word (text generation) of pool samples ``ids``;
    None for image generation, whose target is its input."""
    if task.kind == "image_gen":
        return None
    return np.asarray(ids) % target_count(task)


def target_count(task: TaskSpec) -> int:
    return task.classes if task.kind.endswith("_cls") else ANSWER_WORDS


def make_items(
    task: TaskSpec, ids: np.ndarray, text_len: int, vocab: int, answer_len: int, seed: int
) -> dict[str, np.ndarray]:
    """Samples ``ids`` of the unbounded synthetic pool of ``task``, as federation-file arrays.

    Sample ``i`` depends only on (seed, task name, i), so clients that draw the same id get the
    same sample. The target is :func:`item_targets`. The image carries a colour code ``a`` and
    the text a token code ``b`` (position 1); with both modalities the target is
    ``(a + b) mod K``, so neither input alone predicts it; with one, that code is the target.
    """
    k = target_count(task)
    if "text" in task.modalities and vocab < RESERVED + k:
        raise ValueError(f"task '{task.name}': vocab_size {vocab} < {RESERVED + k}")
    palette = np.random.default_rng([seed, _key(task.name)]).random((k, 3), dtype=np.float32)
    targets = item_targets(task, ids)
    rows = [
        _item(task, np.random.default_rng([seed, _key(task.name), int(i)]), t, k, palette)
        for i, t in zip(ids, targets if targets is not None else [0] * len(ids))
    ]
    out: dict[str, np.ndarray] = {}
    if "image" in task.modalities or task.kind == "image_gen":
        out["image"] = np.stack([r["image"] for r in rows])
    if "text" in task.modalities:
        texts = [_text(r["rng"], text_len, vocab, r["b"], task.kind != "image_gen") for r in rows]
        out["text"] = np.stack([t[0] for t in texts])
        out["text_mask"] = np.stack([t[1] for t in texts])
    if task.kind.endswith("_cls"):
        out["label"] = targets.astype(np.int32)
    if task.kind == "text_gen":
        out["answer"] = np.full((len(ids), answer_len), -100, dtype=np.int32)
        out["answer"][:, 0] = RESERVED + targets
    out["domain"] = np.array([r["domain"] for r in rows], dtype=np.int32)
    return out


def _item(task: TaskSpec, rng: np.random.Generator, target: int, k: int, palette) -> dict:
    if {"image", "text"} <= set(task.modalities):
        a = int(rng.integers(k))
    else:
        a = target if "image" in task.modalities else 0
    item = {"rng": rng, "b": (target - a) % k, "domain": int(rng.integers(len(task.domains)))}
    if "image" in task.modalities or task.kind == "image_gen":
        if task.kind == "image_gen":  # smooth images: upsampled 8 x 8 noise
            small = rng.random((3, 8, 8), dtype=np.float32)
            img = small.repeat(IMAGE_SIZE // 8, axis=1).repeat(IMAGE_SIZE // 8, axis=2)
        else:
            img = rng.random((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32) * 0.5
            img += 0.5 * palette[a][:, None, None]
        item["image"] = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return item


def _text(rng: np.random.Generator, length: int, vocab: int, code: int, coded: bool):
    ids = rng.integers(RESERVED, vocab, length)
    mask = np.arange(length) < rng.integers(max(2, length // 2), length + 1)
    if coded:
        ids[1] = RESERVED + code
    return (ids * mask).astype(np.int32), mask.astype(np.uint8)


def _key(name: str) -> int:
    return zlib.crc32(name.encode())
