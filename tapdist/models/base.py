"""The contract between a model (with its federation's clients) and the round loop.

A model exposes its trainable state under one naming scheme: the union (server) model holds every
name, and each client a subset. The loop only moves these states; it never builds modules, so a
model implementation keeps one resident module and loads a client's state into it to train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from tapdist.local import LocalTrainer

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientInfo:
    """A client as the runtime sees it: id, weight in the average, what it trains."""

    id: int
    num_samples: int
    tasks: tuple[str, ...] = ()


class FederatedModel(Protocol):
    """What a registered model factory returns: ``factory(cfg, device) -> FederatedModel``.

    Algorithms reach a client's data and the resident model only through these methods; all
    randomness comes from generators the loop seeds from (seed, round, client), so results do not
    depend on which rank hosts a client.
    """

    trainer: LocalTrainer  # trains and scores states of the resident model

    def clients(self) -> Sequence[ClientInfo]:
        """Every client of the federation, indexed by id."""

    def task_kinds(self) -> Mapping[str, str]:
        """Every task of the union model -> its kind, in a fixed order."""

    def union_shapes(self) -> Mapping[str, torch.Size]:
        """Ordered names and shapes of every trainable tensor of the union model."""

    def client_keys(self, client: int) -> Sequence[str]:
        """The names of the trainable tensors ``client`` holds (a subset of the union's)."""

    def task_keys(self, client: int, task: str) -> Sequence[str]:
        """The tensors task ``task`` of ``client`` uses: what replacement copies."""

    def initial_state(self) -> State:
        """The union model's initial trainable state (deterministic in the run seed)."""

    def initial_substate(self, client: int) -> State:
        """``client``'s part of the initial state."""

    def train_data(self, client: int) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """The client's training samples: task -> field -> tensor."""

    def test_data(self, client: int) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """The client's held-out samples, as :meth:`train_data`."""

    def evaluate(self, client: int, state: State) -> dict[str, dict[str, float]]:
        """Metrics of ``state`` on the client's held-out samples: task -> metric -> value."""
