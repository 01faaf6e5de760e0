"""Building blocks of the gated transformer: LoRA, experts and attention on shared frozen bases.

A backbone layer is split into :class:`LayerBase`, a view of its frozen modules (layer norms,
q/k/v/o projections, FFN linears). Every expert and attention block built from that layer holds
the *same* LayerBase, not a copy, and owns only its LoRA factors. The bases are kept out of the
module tree on purpose (the backbone registers them once), so they are never counted, moved or
saved twice.

Because every path through one gated layer runs on the same base, the paths run *together*:
activations carry a leading path axis ``(P, batch, length, hidden)``, each frozen projection is
one matmul over all of them, and the paths' own LoRA factors are stacked into two batched
matmuls (:func:`add_stacked_lora`). The number of operators per layer does not grow with the
paths.

Under bf16 autocast a layer norm's output is cast to bf16 once, where it is made
(:func:`matmul_input`), not by each of the up to eight matmuls that read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


def matmul_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype autocast computes matmuls in, cast once for all the matmuls that read
    it (autocast casts an input at each matmul); ``x`` itself where autocast is off."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return x.to(torch.get_autocast_dtype(kind))
    return x


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


def add_stacked_lora(base: torch.Tensor, loras: Sequence[LoRA], x: torch.Tensor) -> torch.Tensor:
    """``base[p] + loras[p](x[p])`` for every path p of ``x`` (P, ..., d_in) and ``base``
    (P, ..., d_out): two batched matmuls, the second adding its scaled product to ``base`` as it
    writes (no separate scale and sum).

    The LoRAs share rank, alpha and dropout (one spec per kind of site). A LoRA that several
    paths use is stacked once per path; its gradient sums over them, as if run path by path.
    """
    first = loras[0]
    paths, d_out = x.shape[0], base.shape[-1]
    flat = first.dropout(x).reshape(paths, -1, x.shape[-1])
    if all(lora is first for lora in loras):  # one LoRA for every path: broadcast, no stacking
        low = (flat @ first.lora_A.T).reshape(-1, first.lora_A.shape[0])
        out = torch.addmm(base.reshape(-1, d_out), low, first.lora_B.T, alpha=first.scale)
    else:
        a = _stacked([lora.lora_A for lora in loras]).transpose(1, 2)
        b = _stacked([lora.lora_B for lora in loras]).transpose(1, 2)
        low = torch.bmm(flat, a)
        out = torch.baddbmm(base.reshape(paths, -1, d_out), low, b, alpha=first.scale)
    return out.view(base.shape)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes its gradient contiguous (one copy). Its forward
    takes ``ctx`` itself: a Function with a separate ``setup_context`` binds its arguments
    through ``inspect.signature`` at every call, which cost a tenth of a small client-round."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _stacked(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(params)``, whose gradient reaches each parameter in its own layout. A
    batched matmul reading the stack transposed returns its gradient transposed; unstacked as
    it is, every parameter's slice would be copied on its own to match the parameter's strides.
    A parameter's first ``.grad`` is then its slice of the stack's gradient (a view, kept as it
    is), so the stacked parameters' gradients share one buffer.
    """
    return _ContiguousGrad.apply(torch.stack(params))


@dataclass(frozen=True)
class _PeftLoRA:
    """A peft LoRA layer's adapter, read as :func:`add_stacked_lora` reads a :class:`LoRA`."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    dropout: nn.Module


def adapted(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a frozen linear that peft may have given a LoRA (the towers' q and v):
    its update is added inside its second matmul, as :func:`add_stacked_lora` does, instead of
    by peft's separate scale and sum. Anything but one plain active adapter runs through peft."""
    adapters = getattr(module, "active_adapters", None)
    if not adapters or len(adapters) != 1 or module.merged or module.disable_adapters:
        return module(x)
    name = adapters[0]
    if getattr(module, "use_dora", {}).get(name) or module.lora_B[name].bias is not None:
        return module(x)
    lora = _PeftLoRA(
        module.lora_A[name].weight,
        module.lora_B[name].weight,
        module.scaling[name],
        module.lora_dropout[name],
    )
    return add_stacked_lora(module.base_layer(x)[None], [lora], x[None]).squeeze(0)


def stacked_adapted(base: nn.Linear, loras: Sequence[LoRA | None], x: torch.Tensor):
    """``W x[p] + B_p A_p x[p]`` for every path p of ``x``: the frozen projection once for all
    paths, plus each path's low-rank update."""
    out = base(x)
    return out if loras[0] is None else add_stacked_lora(out, loras, x)


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


def expert_ffn(
    experts: Sequence[Expert], x: torch.Tensor, frozen_fc1: torch.Tensor | None = None
) -> torch.Tensor:
    """The FFN of ``experts[p]`` on ``x[p]`` for every path p; the experts share one base.
    ``frozen_fc1``, when given, is the base's ``fc1(x)``, computed once for several readers."""
    base = experts[0].base
    pre = base.fc1(x) if frozen_fc1 is None else frozen_fc1
    if experts[0].fc1 is not None:
        pre = add_stacked_lora(pre, [e.fc1 for e in experts], x)
    return stacked_adapted(base.fc2, [e.fc2 for e in experts], base.act(pre))


#: A batch's domains as runs of consecutive samples: ((domain index, samples), ...).
Runs = tuple[tuple[int, int], ...]


def domain_runs(domain: torch.Tensor) -> Runs:
    """The runs of ``domain`` (one host sync; micro-batches of a plan carry them ready)."""
    values, counts = torch.unique_consecutive(domain, return_counts=True)
    return tuple(zip(values.tolist(), counts.tolist()))


class DomainResidual(nn.Module):
    """MoDE: ``x + F_d(x)`` with ``F_d`` the expert of each sample's own domain (one expert per
    domain; :func:`domain_residual` runs them)."""

    def __init__(self, base: LayerBase, domains: list[str], lora: LoraSpec):
        super().__init__()
        self.domains = list(domains)
        self.experts = nn.ModuleDict({d: Expert(base, lora) for d in self.domains})


def domain_residual(
    modes: Sequence[DomainResidual], x: torch.Tensor, runs: Runs, frozen_fc1: torch.Tensor
) -> torch.Tensor:
    """``x + F_d(x)`` of ``modes[p]`` on ``x[p]`` (P, batch, ...): each run of samples through
    its domain's experts. Runs are slices of the batch, so routing needs no device-to-host
    synchronisation."""

    def experts(index: int) -> list[Expert]:
        return [m.experts[m.domains[index]] for m in modes]

    if len(runs) == 1:  # the usual case: micro-batches are grouped by domain
        return x + expert_ffn(experts(runs[0][0]), x, frozen_fc1)
    # split, not sliced: the backward is one cat, not a zero-filled gradient per run
    counts = [count for _, count in runs]
    rows, fc1 = x.split(counts, dim=1), frozen_fc1.split(counts, dim=1)
    parts = [expert_ffn(experts(index), r, f) for (index, _), r, f in zip(runs, rows, fc1)]
    return x + torch.cat(parts, dim=1)


class GatedLayer(nn.Module):
    """One pre-LN layer of a MoTE/MoME block: attention with MoDE on the q and v inputs and
    LoRA on q and v; the FFN is the expert the path chooses (:func:`feed_forward`)."""

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


def attend(
    layers: Sequence[GatedLayer], x: torch.Tensor, key_mask: torch.Tensor | None, runs: Runs
) -> torch.Tensor:
    """The attention half of ``layers[p]`` on ``x[p]`` for every path p, all on one base:
    ``x + o(attention(q, k, v))`` with MoDE before q and v."""
    b = layers[0].base
    a = matmul_input(b.ln1(x))
    frozen_fc1 = b.fc1(a)  # both MoDE stages read the same input through the same base
    q_in = domain_residual([layer.mode_q for layer in layers], a, runs, frozen_fc1)
    v_in = domain_residual([layer.mode_v for layer in layers], a, runs, frozen_fc1)
    q = stacked_adapted(b.q, [layer.lora_q for layer in layers], q_in)
    v = stacked_adapted(b.v, [layer.lora_v for layer in layers], v_in)
    return x + b.o(_attention(q, b.k(a), v, key_mask, b.heads))


def feed_forward(experts: Sequence[Expert], x: torch.Tensor) -> torch.Tensor:
    """The FFN half: ``x[p] + experts[p](ln2(x[p]))`` for every path p."""
    return x + expert_ffn(experts, matmul_input(experts[0].base.ln2(x)))


def tower_layer(
    b: LayerBase,
    x: torch.Tensor,
    key_mask: torch.Tensor | None,
    dropout: float,
    attn_dropout: float,
) -> torch.Tensor:
    """One frozen pre-LN layer of a backbone tower on ``x`` (batch, length, hidden), with fused
    attention; LoRA, where the tower has it, is peft's on its q and v modules (run by
    :func:`adapted`). ``dropout`` is the layer's hidden dropout and ``attn_dropout`` that of the
    attention weights (training only)."""
    a = matmul_input(b.ln1(x))
    q, k, v = adapted(b.q, a)[None], b.k(a)[None], adapted(b.v, a)[None]
    out = b.o(_attention(q, k, v, key_mask, b.heads, attn_dropout))
    x = x + _dropout(out.squeeze(0), dropout)
    return x + _dropout(b.fc2(b.act(b.fc1(b.ln2(x)))), dropout)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x


def _attention(q, k, v, key_mask, heads: int, dropout: float = 0.0) -> torch.Tensor:
    """Multi-head attention of (P, batch, length, hidden) inputs; ``key_mask`` (batch, length)
    is shared by the paths. ``dropout`` applies to the attention weights."""
    paths, bsz, length, dim = q.shape

    def split(t):
        return t.view(paths * bsz, length, heads, dim // heads).transpose(1, 2)

    mask = None
    if key_mask is not None:
        mask = key_mask.bool()[None, :, None, None, :].expand(paths, -1, -1, -1, -1)
        mask = mask.reshape(paths * bsz, 1, 1, length)
    out = F.scaled_dot_product_attention(
        split(q), split(k), split(v), attn_mask=mask, dropout_p=dropout
    )
    return out.transpose(1, 2).reshape(paths, bsz, length, dim)
