"""A stand-in model for runtime tests: small linear experts over synthetic multi-task data.

It has what the round loop cares about in the real model: a union of named trainable tensors,
clients holding different subsets of it (by modality and task), unequal data sizes, and training
whose only randomness is the generator the loop hands in. It lives under tests/ because the
product ships only the TAP model; it plugs in through the same model registry.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from tapdist.models.base import ClientInfo
from tapdist.registry import MODELS

DIM, CLASSES = 8, 4
# (modalities, tasks) by client id modulo 4: covers both modalities and both task kinds.
PATTERNS = (
    (("image",), ("cls",)),
    (("text",), ("cls",)),
    (("image", "text"), ("gen",)),
    (("text",), ("cls", "gen")),
)


class StandIn:
    def __init__(self, cfg, device: torch.device):
        self.steps, self.batch, self.lr = cfg.train.local_steps, cfg.train.batch_size, cfg.train.lr
        self.seed = cfg.run.seed
        self.specs = [PATTERNS[c % len(PATTERNS)] for c in range(cfg.federation.clients)]
        self.data = [self._make_data(c) for c in range(cfg.federation.clients)]

    def clients(self) -> list[ClientInfo]:
        return [
            ClientInfo(c, len(d["target"]), "+".join(m) + ": " + "+".join(t))
            for c, (d, (m, t)) in enumerate(zip(self.data, self.specs))
        ]

    def union_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "enc.image.weight": (DIM, DIM),
            "enc.text.weight": (DIM, DIM),
            "shared.weight": (DIM, DIM),
            "head.cls.weight": (CLASSES, DIM),
            "head.cls.bias": (CLASSES,),
            "head.gen.weight": (DIM, DIM),
        }

    def client_keys(self, client: int) -> list[str]:
        mods, tasks = self.specs[client]
        keys = [f"enc.{m}.weight" for m in mods] + ["shared.weight"]
        for task in tasks:
            keys += ["head.cls.weight", "head.cls.bias"] if task == "cls" else ["head.gen.weight"]
        return keys

    def initial_state(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return {
            name: 0.3 * torch.randn(shape, generator=gen)
            for name, shape in self.union_shapes().items()
        }

    def local_train(self, client, state, generator):
        if os.environ.get("STANDIN_FAIL_CLIENT") == str(client):  # failure-path tests
            raise RuntimeError(f"injected failure in client {client}")
        params = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
        data, (mods, tasks) = self.data[client], self.specs[client]
        n, losses = len(data["target"]), []
        for _ in range(self.steps):
            idx = torch.randint(n, (min(self.batch, n),), generator=generator)
            loss = self._loss(params, {k: v[idx] for k, v in data.items()}, mods, tasks)
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p.sub_(self.lr * g)
            losses.append(loss.item())
        return {k: v.detach() for k, v in params.items()}, {"loss": float(np.mean(losses))}

    def _loss(self, p, batch, mods, tasks):
        h = sum(batch[m] @ p[f"enc.{m}.weight"].T for m in mods)
        z = h + torch.tanh(h @ p["shared.weight"].T)
        loss = 0.0
        if "cls" in tasks:
            loss = loss + F.cross_entropy(
                z @ p["head.cls.weight"].T + p["head.cls.bias"], batch["label"]
            )
        if "gen" in tasks:
            loss = loss + F.mse_loss(z @ p["head.gen.weight"].T, batch["target"])
        return loss

    def _make_data(self, client: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, client])
        n = 24 + 8 * (client % 5)
        x = {m: rng.standard_normal((n, DIM)).astype(np.float32) for m in ("image", "text")}
        teacher = rng.standard_normal((DIM, DIM)).astype(np.float32) / np.sqrt(DIM)
        target = sum(x[m] for m in self.specs[client][0]) @ teacher
        label = np.argmax(target[:, :CLASSES], axis=1)
        return {
            "image": torch.from_numpy(x["image"]),
            "text": torch.from_numpy(x["text"]),
            "target": torch.from_numpy(target),
            "label": torch.from_numpy(label),
        }


@MODELS.register("standin")
def build(cfg, device):
    return StandIn(cfg, device)
