"""FL algorithms as hook sets: the round loop is written once and calls these.

An algorithm decides what a sampled client does with its copy of the global sub-model and what it
uploads. The model's forward never knows which algorithm runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tapdist.config import Config
from tapdist.models.base import FederatedModel, State
from tapdist.registry import ALGORITHMS


@dataclass
class ClientUpdate:
    """One client's round: the state it uploads and its metrics (named by metric_names)."""

    upload: State
    metrics: dict[str, float]


class Algorithm(ABC):
    """Hooks of one FL algorithm."""

    #: Per-client metrics every update reports; they travel in the round's one collective.
    metric_names: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: Config, model: FederatedModel):
        self.cfg, self.model = cfg, model

    @abstractmethod
    def client_round(
        self, client: int, global_sub: State, round_index: int, generator: torch.Generator
    ) -> ClientUpdate:
        """Run ``client``'s part of round ``round_index`` from its global sub-state."""


@ALGORITHMS.register("fedavg")
class FedAvg(Algorithm):
    """Each sampled client trains its copy of the global sub-model and uploads it."""

    def client_round(
        self, client: int, global_sub: State, round_index: int, generator: torch.Generator
    ) -> ClientUpdate:
        state, metrics = self.model.local_train(client, global_sub, generator)
        return ClientUpdate(state, metrics)
