"""Sources of a federation build: each turns one task of a build spec into a :class:`Pool`.

A pool is a set of sample ids split once, by the seed, into a train part and a test part, and a
function that makes the federation-file arrays of any ids. Clients draw their train samples from
the train part and their test samples from the test part, so no test sample is any client's
training sample. Tasks built from the same dataset (MNIST classification, MNIST questions) share
one split of that dataset.

This module holds the generated and shipped sources; :mod:`tapdist.data.local` reads the user's
own files.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from tapdist.data import DataError, shipped
from tapdist.data.hdf5 import IGNORE, Dims, task_fields
from tapdist.data.synthetic import item_targets, make_items, target_count
from tapdist.models.tap import TaskSpec

SYNTHETIC_POOL = 100_000  # ids of a synthetic pool; samples are made only when drawn


@dataclass(frozen=True)
class TaskEntry:
    """One task of a build spec: the task and where its samples come from."""

    name: str
    kind: str
    source: str
    modalities: tuple[str, ...]
    domains: tuple[str, ...]
    classes: int
    options: dict

    def spec(self, classes: int | None = None) -> TaskSpec:
        return TaskSpec(self.name, self.kind, self.modalities, self.domains, classes or 0)

    def fields(self) -> tuple[str, ...]:
        """The federation-file arrays of this task (they do not depend on its class count)."""
        return task_fields(self.spec(self.classes or 2))


@dataclass(frozen=True)
class Pool:
    """The samples one task can draw (see the module docstring).

    ``targets[id]`` is the class of sample ``id`` (its digit, its topic) where the source has
    classes; a client's ``labels`` key selects by it.
    """

    train: np.ndarray
    test: np.ndarray
    make: Callable[[np.ndarray], dict[str, np.ndarray]]
    classes: int = 0  # the task's classes (classification)
    targets: np.ndarray | None = None
    target_count: int = 0
    label_names: list[str] | None = None


@dataclass
class BuildContext:
    """What every source of one build shares: sizes, seed, paths, the tokenizer, the splits."""

    seed: int
    dims: Dims
    test_fraction: float
    data_root: Path
    tokenizer_dir: Path | None
    _splits: dict = field(default_factory=dict)

    def rng(self, *keys: int | str) -> np.random.Generator:
        """A generator for ``keys`` under this build's seed; strings are hashed stably."""
        ints = [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
        return np.random.default_rng([self.seed, *ints])

    def split(self, dataset: str, count: int, groups: np.ndarray | None = None):
        """(train ids, test ids) of ``count`` samples of ``dataset``, the same for every task of
        the build. Samples of one group (near-duplicates) fall on the same side."""
        if (dataset, count) not in self._splits:
            groups = np.arange(count) if groups is None else groups
            order = self.rng("split", dataset).permutation(np.unique(groups))
            sizes = np.bincount(groups)[order]
            n_test = int(np.searchsorted(np.cumsum(sizes), self.test_fraction * count)) + 1
            test = np.isin(groups, order[:n_test])
            self._splits[dataset, count] = (np.flatnonzero(~test), np.flatnonzero(test))
        return self._splits[dataset, count]

    def tokenizer(self) -> Tokenizer:
        if self.tokenizer_dir is None:
            raise DataError("this spec's text tasks need a tokenizer: set `tokenizer:` in it")
        return load_tokenizer(str(self.tokenizer_dir))


class Tokenizer:
    """A BERT WordPiece tokenizer producing fixed-width federation-file arrays."""

    def __init__(self, directory: str):
        from transformers import BertTokenizerFast

        try:
            self._tok = BertTokenizerFast.from_pretrained(directory)
        except (OSError, ValueError) as err:
            raise DataError(
                f"tokenizer {directory}: cannot load a BERT tokenizer from it ({err}); give a "
                "folder with vocab.txt or tokenizer.json"
            ) from None

    def __len__(self) -> int:
        return len(self._tok)

    def texts(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int32) and mask (uint8) of width ``length``: [CLS] ... [SEP], 0-padded."""
        out = self._tok(
            [_cut(t, length) for t in texts],
            max_length=length,
            padding="max_length",
            truncation=True,
        )
        ids = np.array(out["input_ids"], dtype=np.int32).reshape(len(texts), length)
        mask = np.array(out["attention_mask"], dtype=np.uint8).reshape(len(texts), length)
        return ids, mask

    def answers(self, texts: list[str], length: int) -> np.ndarray:
        """Answer token ids without [CLS]/[SEP], truncated to ``length``, padded with -100."""
        ids = self._tok([_cut(t, length) for t in texts], add_special_tokens=False)["input_ids"]
        out = np.full((len(texts), length), IGNORE, dtype=np.int32)
        for row, tokens in zip(out, ids):
            row[: min(length, len(tokens))] = tokens[:length]
        return out

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if i > 0], skip_special_tokens=True)


@lru_cache(maxsize=4)
def load_tokenizer(directory: str) -> Tokenizer:
    return Tokenizer(directory)


def _cut(text: str, length: int) -> str:
    # A WordPiece token spans at least one non-space character: a long text, its whitespace runs
    # made single spaces (WordPiece splits on any whitespace), cut at a word boundary far past
    # `length` tokens tokenizes to the same first tokens, and much faster.
    limit = 16 * length
    if len(text) <= limit:
        return text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]


# --- generated and shipped sources -------------------------------------------------------------


def synthetic_pool(entry: TaskEntry, ctx: BuildContext) -> Pool:
    """Learnable generated samples (:func:`tapdist.data.synthetic.make_items`)."""
    task = entry.spec(entry.classes)
    size = int(entry.options.get("pool", SYNTHETIC_POOL))
    ids = np.arange(size)
    n_test = max(1, round(size * ctx.test_fraction))
    dims = ctx.dims

    def make(chosen: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return make_items(
                task, chosen, dims.text_len, dims.vocab_size, dims.answer_len, ctx.seed
            )
        except ValueError as err:
            raise DataError(f"task '{task.name}': {err}") from None

    targets = item_targets(task, ids)
    count = 0 if targets is None else target_count(task)
    return Pool(ids[n_test:], ids[:n_test], make, task.classes, targets, count)


def mnist_pool(entry: TaskEntry, ctx: BuildContext) -> Pool:
    """MNIST digits (classification or reconstruction), 28 x 28 upscaled to 64 x 64."""
    return _digit_pool(entry, ctx, "mnist", shipped.mnist())


def digits_pool(entry: TaskEntry, ctx: BuildContext) -> Pool:
    """scikit-learn's 8 x 8 digits (classification or reconstruction), upscaled to 64 x 64."""
    return _digit_pool(entry, ctx, "digits", shipped.digits())


def _digit_pool(entry: TaskEntry, ctx: BuildContext, key: str, images: shipped.Images) -> Pool:
    train, test = ctx.split(key, len(images.labels))
    cls = entry.kind.endswith("_cls")

    def make(ids: np.ndarray) -> dict[str, np.ndarray]:
        out = {"image": shipped.to_rgb64(images.pixels[ids])}
        if cls:
            out["label"] = images.labels[ids].astype(np.int32)
        return {**out, "domain": np.zeros(len(ids), np.int32)}

    names = [str(d) for d in range(10)] if cls else None
    return Pool(train, test, make, 10 if cls else 0, images.labels, 10, names)


def bbc_news_pool(entry: TaskEntry, ctx: BuildContext) -> Pool:
    """BBC News: topic classification of the article, or its title generated from its body."""
    news, tok, dims = shipped.bbc_news(), ctx.tokenizer(), ctx.dims
    train, test = ctx.split("bbc_news", len(news.titles), _near_duplicates(news))
    cls = entry.kind == "text_cls"

    def make(ids: np.ndarray) -> dict[str, np.ndarray]:
        if cls:
            text, mask = tok.texts(
                [f"{news.titles[i]}\n{news.bodies[i]}" for i in ids], dims.text_len
            )
            out = {"text": text, "text_mask": mask, "label": news.topics[ids].astype(np.int32)}
        else:
            text, mask = tok.texts([news.bodies[i] for i in ids], dims.text_len)
            answer = tok.answers([news.titles[i] for i in ids], dims.answer_len)
            out = {"text": text, "text_mask": mask, "answer": answer}
        return {**out, "domain": np.zeros(len(ids), np.int32)}

    names = news.topic_names
    return Pool(train, test, make, len(names) if cls else 0, news.topics, len(names), names)


def _near_duplicates(news: shipped.Articles) -> np.ndarray:
    """A group per set of articles sharing a title or the first words of the body (reprints),
    whose token rows could be identical: they must not straddle the train/test split."""
    parent = list(range(len(news.titles)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, (title, body) in enumerate(zip(news.titles, news.bodies)):
        for key in ("t:" + title.lower(), "b:" + " ".join(body.lower().split()[:6])):
            parent[root(i)] = root(first.setdefault(key, i))
    return np.array([root(i) for i in range(len(parent))])


QUESTIONS = (
    "what digit is this?",
    "is this digit even or odd?",
    "what is this digit plus one?",
    "is this digit bigger than five?",
)


def vqa_answer(question: int, digit: int) -> str:
    """The word answering ``QUESTIONS[question]`` about ``digit``."""
    words = (*shipped.DIGIT_NAMES, "ten")
    return (
        words[digit],
        "even" if digit % 2 == 0 else "odd",
        words[digit + 1],
        "yes" if digit > 5 else "no",
    )[question]


def digit_vqa_pool(entry: TaskEntry, ctx: BuildContext) -> Pool:
    """Questions about digit images, answered in words: the answer needs image and question.

    Sample id ``i`` pairs image ``i // Q`` with question ``i % Q``; the images keep the split
    of their dataset, so a question about a test image is never a training sample.
    """
    key = entry.options.get("images", "mnist")
    images = {"mnist": shipped.mnist, "digits": shipped.digits}[key]()
    tok, dims, q = ctx.tokenizer(), ctx.dims, len(QUESTIONS)
    questions = tok.texts(list(QUESTIONS), dims.text_len)
    train, test = (ids[:, None] * q + np.arange(q) for ids in ctx.split(key, len(images.labels)))

    def make(ids: np.ndarray) -> dict[str, np.ndarray]:
        digit, question = images.labels[ids // q], ids % q
        words = [vqa_answer(int(k), int(d)) for k, d in zip(question, digit)]
        return {
            "image": shipped.to_rgb64(images.pixels[ids // q]),
            "text": questions[0][question],
            "text_mask": questions[1][question],
            "answer": tok.answers(words, dims.answer_len),
            "domain": np.zeros(len(ids), np.int32),
        }

    return Pool(train.ravel(), test.ravel(), make, 0, np.repeat(images.labels, q), 10)
