"""Task heads: classification, image generation (3 x 64 x 64), text generation (parallel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 64  # TAP's images are 64 x 64; generation reconstructs them


class ClassificationHead(nn.Module):
    def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, classes))

    def forward(self, feature: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        return self.mlp(feature)

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(out, batch["label"])


class ImageGenerationHead(nn.Module):
    """Linear to 64 x 8 x 8, then three transposed convolutions up to 3 x 64 x 64."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 64 * 8 * 8)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, feature: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        return self.up(self.fc(feature).view(-1, 64, 8, 8))

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.mse_loss(out, batch["image"])


class TextGenerationHead(nn.Module):
    """Position queries cross-attend to the path features, one GPT-2-style block, an LM head:
    every answer position is predicted at once. No token-embedding table: nothing reads one."""

    def __init__(self, hidden: int, heads: int, vocab: int, length: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(length, hidden) * 0.02)
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.block = nn.TransformerEncoderLayer(
            hidden,
            heads,
            4 * hidden,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, feature: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(paths.shape[0], -1, -1)
        memory = torch.cat([feature[:, None], paths], dim=1)
        x, _ = self.cross(queries, memory, memory, need_weights=False)
        return self.lm_head(self.norm(self.block(x + queries)))

    def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        # padding positions carry label -100 and do not count
        return F.cross_entropy(out.flatten(0, 1), batch["answer"].flatten(), ignore_index=-100)
