"""Building blocks of the gated transformer: LoRA, experts and attention on shared frozen bases.

A backbone layer is split into :class:`LayerBase`, a view of its frozen modules (layer norms,
q/k/v/o projections, FFN linears). Every expert and attention block built from that layer holds
the *same* LayerBase, not a copy, and owns only its LoRA factors. The bases are kept out of the
module tree on purpose (the backbone registers them once), so they are never counted, moved or
saved twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, eq=False)
class LayerBase:
    """The frozen modules of one pre-LN transformer layer of the backbone."""

    ln1: nn.LayerNorm
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    ln2: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    heads: int

    @property
    def hidden(self) -> int:
        return self.q.in_features

    def modules(self) -> list[nn.Module]:
        """The frozen modules themselves (the activation has no weights)."""
        return [self.ln1, self.q, self.k, self.v, self.o, self.ln2, self.fc1, self.fc2]


class LoRA(nn.Module):
    """The low-rank update ``(alpha / r) * B A x``; B starts at zero, so training starts at W x."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale


def adapted(base: nn.Linear, lora: LoRA | None, x: torch.Tensor) -> torch.Tensor:
    """``W x + B A x``: the frozen projection once, plus the low-rank update."""
    out = base(x)
    return out if lora is None else out + lora(x)


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float

    def make(self, d_in: int, d_out: int) -> LoRA | None:
        return LoRA(d_in, d_out, self.rank, self.alpha, self.dropout) if self.rank > 0 else None


class Expert(nn.Module):
    """A frozen backbone FFN with LoRA on both linears (MoTE, MoME and MoDE experts)."""

    def __init__(self, base: LayerBase, lora: LoraSpec):
        super().__init__()
        self._base = (base,)  # a tuple keeps the shared frozen layer out of the module tree
        self.fc1 = lora.make(base.fc1.in_features, base.fc1.out_features)
        self.fc2 = lora.make(base.fc2.in_features, base.fc2.out_features)

    @property
    def base(self) -> LayerBase:
        return self._base[0]

    def forward(self, x: torch.Tensor, frozen_fc1: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN of ``x``. Experts on one base and one input share the frozen ``fc1(x)``:
        pass it as ``frozen_fc1`` to compute it once."""
        pre = self.base.fc1(x) if frozen_fc1 is None else frozen_fc1
        if self.fc1 is not None:
            pre = pre + self.fc1(x)
        return adapted(self.base.fc2, self.fc2, self.base.act(pre))


#: A batch's domains as runs of consecutive samples: ((domain index, samples), ...).
Runs = tuple[tuple[int, int], ...]


def domain_runs(domain: torch.Tensor) -> Runs:
    """The runs of ``domain`` (one host sync; micro-batches of a plan carry them ready)."""
    values, counts = torch.unique_consecutive(domain, return_counts=True)
    return tuple(zip(values.tolist(), counts.tolist()))


class DomainResidual(nn.Module):
    """MoDE: ``x + F_d(x)`` with ``F_d`` the expert of each sample's own domain."""

    def __init__(self, base: LayerBase, domains: list[str], lora: LoraSpec):
        super().__init__()
        self.domains = list(domains)
        self.experts = nn.ModuleDict({d: Expert(base, lora) for d in self.domains})

    def forward(
        self, x: torch.Tensor, runs: Runs, frozen_fc1: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each run of samples through its domain's expert: slices of the batch, so routing
        needs no device-to-host synchronisation."""
        if len(runs) == 1:  # the usual case: micro-batches are grouped by domain
            return x + self.experts[self.domains[runs[0][0]]](x, frozen_fc1)
        parts, start = [], 0
        for index, count in runs:
            rows = slice(start, start + count)
            pre = None if frozen_fc1 is None else frozen_fc1[rows]
            parts.append(self.experts[self.domains[index]](x[rows], pre))
            start += count
        return x + torch.cat(parts)


class GatedLayer(nn.Module):
    """One pre-LN layer of a MoTE/MoME block: attention with MoDE on the q and v inputs and
    LoRA on q and v; the FFN is the expert the path chooses, passed in at call time."""

    def __init__(self, base: LayerBase, domains: list[str], attn: LoraSpec, mode: LoraSpec):
        super().__init__()
        self._base = (base,)
        d = base.hidden
        self.lora_q = attn.make(d, d)
        self.lora_v = attn.make(d, d)
        self.mode_q = DomainResidual(base, domains, mode)
        self.mode_v = DomainResidual(base, domains, mode)

    @property
    def base(self) -> LayerBase:
        return self._base[0]

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, runs: Runs, expert: Expert
    ) -> torch.Tensor:
        return self.feed_forward(self.attend(x, key_mask, runs), [expert])[0]

    def attend(self, x: torch.Tensor, key_mask: torch.Tensor | None, runs: Runs) -> torch.Tensor:
        """The attention half: ``x + o(attention(q, k, v))`` with MoDE before q and v."""
        b = self.base
        a = b.ln1(x)
        frozen_fc1 = b.fc1(a)  # both MoDE experts read the same input through the same base
        q = adapted(b.q, self.lora_q, self.mode_q(a, runs, frozen_fc1))
        v = adapted(b.v, self.lora_v, self.mode_v(a, runs, frozen_fc1))
        return x + b.o(_attention(q, b.k(a), v, key_mask, b.heads))

    def feed_forward(self, x: torch.Tensor, experts: list[Expert]) -> list[torch.Tensor]:
        """The FFN half for each of ``experts`` on the same ``x`` (paths that share the
        attention), computing the frozen part of their first linear once."""
        h = self.base.ln2(x)
        frozen_fc1 = self.base.fc1(h) if len(experts) > 1 else None
        return [x + expert(h, frozen_fc1) for expert in experts]


def _attention(q, k, v, key_mask, heads: int) -> torch.Tensor:
    bsz, length, dim = q.shape

    def split(t):
        return t.view(bsz, -1, heads, dim // heads).transpose(1, 2)

    mask = None if key_mask is None else key_mask[:, None, None, :].bool()
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(bsz, length, dim)
