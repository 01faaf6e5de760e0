"""Roles as data: which rank is the server, which ranks host which clients, who trains when.

Every rank builds the same :class:`Topology` from the config and the clients' sizes, and derives
each round's sample from (seed, round) alone, so no control messages are needed and the results
do not depend on how many processes share the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PLACEMENTS = ("round_robin", "balanced")


class TopologyError(ValueError):
    """The ranks and clients cannot be laid out as configured."""


@dataclass(frozen=True)
class Topology:
    """Server rank and the client-to-rank placement, validated on construction."""

    world_size: int
    client_sizes: tuple[int, ...]  # training samples per client, by client id
    server_hosts_clients: bool = True
    placement: str = "round_robin"
    allow_idle_ranks: bool = False
    server_rank: int = 0
    host_of: tuple[int, ...] = field(init=False)  # client id -> rank

    def __post_init__(self) -> None:
        self._validate()
        object.__setattr__(self, "host_of", tuple(self._place()))

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    @property
    def host_ranks(self) -> tuple[int, ...]:
        """Ranks that train clients, in order."""
        return tuple(
            r for r in range(self.world_size) if r != self.server_rank or self.server_hosts_clients
        )

    def is_server(self, rank: int) -> bool:
        return rank == self.server_rank

    def clients_of(self, rank: int) -> tuple[int, ...]:
        return tuple(c for c, r in enumerate(self.host_of) if r == rank)

    def _validate(self) -> None:
        hosts = self.world_size - (0 if self.server_hosts_clients else 1)
        facts = (
            f"world size {self.world_size}, {self.num_clients} clients, "
            f"server_hosts_clients={self.server_hosts_clients}"
        )
        if self.world_size < 1:
            raise TopologyError(f"world size must be >= 1 ({facts})")
        if self.num_clients < 1:
            raise TopologyError(f"a federation needs at least one client ({facts})")
        if any(n < 1 for n in self.client_sizes):
            empty = [c for c, n in enumerate(self.client_sizes) if n < 1]
            raise TopologyError(
                f"clients {empty} have no training samples; every client needs "
                "at least one (its weight in the average is its sample count)"
            )
        if self.placement not in PLACEMENTS:
            raise TopologyError(
                f"placement '{self.placement}' is unknown; accepted: " + ", ".join(PLACEMENTS)
            )
        if hosts < 1:
            raise TopologyError(
                f"no rank can host clients ({facts}): set "
                "dist.server_hosts_clients=true or start more ranks"
            )
        if hosts > self.num_clients and not self.allow_idle_ranks:
            raise TopologyError(
                f"{hosts} client-hosting ranks but only {self.num_clients} clients ({facts}): "
                f"start at most {self.num_clients + (0 if self.server_hosts_clients else 1)} "
                "ranks, or set dist.allow_idle_ranks=true to keep the extra ranks idle"
            )

    def _place(self) -> list[int]:
        hosts = self.host_ranks
        if self.placement == "round_robin":
            return [hosts[c % len(hosts)] for c in range(self.num_clients)]
        # Balanced: largest client first onto the least-loaded rank (ties: lower rank), which
        # keeps every rank's total samples within one client of the others.
        load = {r: 0 for r in hosts}
        host_of = [0] * self.num_clients
        for c in sorted(range(self.num_clients), key=lambda c: (-self.client_sizes[c], c)):
            rank = min(hosts, key=lambda r: (load[r], r))
            host_of[c] = rank
            load[rank] += self.client_sizes[c]
        return host_of


def sample_clients(seed: int, round_index: int, num_clients: int, k: int) -> list[int]:
    """The clients of round ``round_index``: ``k`` distinct ids, sorted, from (seed, round)."""
    if not 1 <= k <= num_clients:
        raise ValueError(f"cannot sample {k} of {num_clients} clients")
    rng = np.random.default_rng([seed, round_index, _SAMPLE_STREAM])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one purpose (e.g. client c's training in round r) from the run seed."""
    words = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


_SAMPLE_STREAM = 0x5A3
