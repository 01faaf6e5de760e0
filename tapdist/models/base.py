"""The contract between a model (with its federation's clients) and the round loop.

A model exposes its trainable state under one naming scheme: the union (server) model holds every
name, and each client a subset. The loop only moves these states; it never builds modules, so a
model implementation keeps one resident module and loads a client's state into it to train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientInfo:
    """A client as the runtime sees it: id, weight in the average, what it trains."""

    id: int
    num_samples: int
    description: str = ""


class FederatedModel(Protocol):
    """What a registered model factory returns: ``factory(cfg, device) -> FederatedModel``."""

    def clients(self) -> Sequence[ClientInfo]:
        """Every client of the federation, indexed by id."""

    def union_shapes(self) -> Mapping[str, torch.Size]:
        """Ordered names and shapes of every trainable tensor of the union model."""

    def client_keys(self, client: int) -> Sequence[str]:
        """The names of the trainable tensors ``client`` holds (a subset of the union's)."""

    def initial_state(self) -> State:
        """The union model's initial trainable state (deterministic in the run seed)."""

    def local_train(
        self, client: int, state: State, generator: torch.Generator
    ) -> tuple[State, dict[str, float]]:
        """Train ``client`` from ``state`` (its sub-state); return the new state and metrics.

        All randomness comes from ``generator``, which the loop seeds from (seed, round, client),
        so the result does not depend on which rank trains the client.
        """
