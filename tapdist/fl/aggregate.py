"""TAP's sparse, weighted aggregation as one flat buffer and one collective.

Every trainable tensor of the union (server) model has a fixed place in the union layout; a
round's buffer lays out, in that order, the tensors its sampled clients hold (every rank derives
the same set), with one count slot per tensor. A rank adds ``weight * value`` of each client it
trained into the values (``weight * (value - global)`` with the bf16 wire) and ``weight`` into
the count slots of the tensors that client holds; the buffers of all ranks are summed (one
all_reduce; two with the bf16 wire); a tensor becomes ``value / count`` where its count is
positive and keeps its old value elsewhere. Clients holding different subsets of the union is what
makes the average sparse: each tensor is averaged over exactly the clients that hold it.

The layout, packing and averaging are functions of tensors; :func:`all_reduce_round` makes the
collective through the caller's context, and a :class:`Workspace` keeps a buffer's memory from
one round to the next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class FlatLayout:
    """Fixed positions of the union model's trainable tensors in one flat buffer."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]  # start of each tensor; offsets[-1] + its numel == numel
    numel: int

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> FlatLayout:
        """Layout in the mapping's order (the union model's parameter order)."""
        names, sizes, offsets, total = [], [], [], 0
        for name, shape in shapes.items():
            size = torch.Size(shape)
            names.append(name)
            sizes.append(size)
            offsets.append(total)
            total += size.numel()
        return cls(tuple(names), tuple(sizes), tuple(offsets), total)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError("duplicate tensor names in the union layout")
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(self.names)})

    def __len__(self) -> int:
        return len(self.names)

    def restrict(self, names: set[str] | frozenset[str]) -> FlatLayout:
        """The layout of just ``names``, in this layout's order (a round's active tensors)."""
        unknown = set(names) - set(self.names)
        if unknown:
            raise KeyError(f"not tensors of the union model: {sorted(unknown)}")
        return FlatLayout.from_shapes({n: s for n, s in zip(self.names, self.shapes) if n in names})

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"'{name}' is not a tensor of the union model") from None

    def span(self, name: str) -> slice:
        i = self.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.shapes[i].numel())


class Workspace:
    """Memory that every round's buffer is carved from, grown to the largest round so far.

    A fresh host tensor of a few hundred MB costs a page fault per 4 kB page each time it is
    first written, every round (on the CPU that is more than zeroing it); a GPU's caching
    allocator reuses its memory by itself, so there the workspace only saves the allocator's
    bookkeeping. The previous round's buffer must be spent when the next one is taken.
    """

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None
        self._kind: tuple[torch.dtype, torch.device | str] | None = None

    def take(self, size: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """``size`` elements of the workspace's memory, uninitialised."""
        if self._flat is None or self._flat.numel() < size or self._kind != (dtype, device):
            self._flat = None  # the old memory goes back before the new is taken
            self._flat = torch.empty(size, dtype=dtype, device=device)
            self._kind = (dtype, device)
        return self._flat[:size]


@dataclass
class RoundBuffer:
    """What one rank contributes to a round: weighted values, weights, and client statistics.

    All three live in one contiguous ``flat`` tensor (fp64 or fp32, the accumulation dtype) so a
    round needs one all_reduce; with a bf16 transport the values travel as a separate bf16
    buffer and counts and statistics in the accumulation dtype.
    """

    layout: FlatLayout
    flat: torch.Tensor  # [values | counts | stats]
    stats_shape: tuple[int, int]

    @classmethod
    def zeros(
        cls,
        layout: FlatLayout,
        n_clients: int,
        n_stats: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        workspace: Workspace | None = None,
    ) -> RoundBuffer:
        """A zeroed buffer; with a ``workspace``, carved from its memory (round after round)."""
        size = layout.numel + len(layout) + n_clients * n_stats
        if workspace is None:
            flat = torch.zeros(size, dtype=dtype, device=device)
        else:
            flat = workspace.take(size, dtype, device).zero_()
        return cls(layout, flat, (n_clients, n_stats))

    @property
    def values(self) -> torch.Tensor:
        return self.flat[: self.layout.numel]

    @property
    def counts(self) -> torch.Tensor:
        return self.flat[self.layout.numel : self.layout.numel + len(self.layout)]

    @property
    def stats(self) -> torch.Tensor:
        return self.flat[self.layout.numel + len(self.layout) :].view(self.stats_shape)

    @property
    def tail(self) -> torch.Tensor:
        """Counts and stats: the part that keeps the accumulation dtype under a bf16 transport."""
        return self.flat[self.layout.numel :]


def accumulate(
    buf: RoundBuffer, state: State, weight: float, reference: State | None = None
) -> None:
    """Add ``weight * state`` into ``buf`` for the tensors ``state`` holds (a client's upload);
    with a ``reference`` (the round's global state), add ``weight * (state - reference)``."""
    layout = buf.layout
    for name, tensor in state.items():
        i = layout.index(name)
        if tensor.shape != layout.shapes[i]:
            raise ValueError(
                f"'{name}' has shape {tuple(tensor.shape)}; the union layout "
                f"expects {tuple(layout.shapes[i])}"
            )
        value = tensor.detach().reshape(-1).to(buf.flat.dtype)
        if reference is not None:
            value = value - reference[name].detach().reshape(-1).to(buf.flat.dtype)
        buf.values[layout.span(name)].add_(value, alpha=weight)
        buf.counts[i] += weight


def finalize(buf: RoundBuffer, old: State, deltas: bool = False) -> dict[str, torch.Tensor]:
    """The averaged union state: value/count where count > 0, the old tensor elsewhere.
    With ``deltas`` the buffer holds weighted updates: old + value/count.

    The new tensors never share the buffer's memory, and each costs one pass over its values:
    in the tensor's own dtype the quotient is the new tensor; in another (fp64 accumulation of
    fp32 weights) the values are divided in place and cast once, so the buffer's values are
    spent afterwards. Counts and stats are left as they are.
    """
    layout, new = buf.layout, {}
    counts = buf.counts.tolist()
    for i, name in enumerate(layout.names):
        if counts[i] > 0:
            values, dtype = buf.values[layout.span(name)].view(layout.shapes[i]), old[name].dtype
            avg = values / counts[i] if values.dtype == dtype else values.div_(counts[i])
            if deltas:
                avg.add_(old[name])  # in the accumulation dtype, as old + value/count
            new[name] = avg.to(dtype)
        else:
            new[name] = old[name]
    return new


def pack(layout: FlatLayout, state: State) -> torch.Tensor:
    """A full union state as one flat fp32 tensor (for broadcasts and checks)."""
    return torch.cat([state[n].detach().reshape(-1).to(torch.float32) for n in layout.names])


def unpack(layout: FlatLayout, flat: torch.Tensor, like: State) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack`, in the dtypes of ``like``."""
    return {
        n: flat[layout.span(n)].view(s).to(like[n].dtype).clone()
        for n, s in zip(layout.names, layout.shapes)
    }


def sends_deltas(transport_dtype: str) -> bool:
    """bf16 carries updates (upload - global), not weights: bf16 cannot resolve a small update
    on top of a weight near 1 (a LayerNorm scale of 1.0 + 2e-3 rounds back to 1.0)."""
    return transport_dtype == "bf16"


def accumulation_dtype(transport_dtype: str) -> torch.dtype:
    """fp64 accumulates and travels in float64; fp32 and bf16 accumulate in float32."""
    return torch.float64 if transport_dtype == "fp64" else torch.float32


def all_reduce_round(ctx, buf: RoundBuffer, transport_dtype: str, what: str) -> int:
    """Sum ``buf`` over all ranks; returns the bytes this rank put on the wire (0 alone).

    fp64 and fp32: one all_reduce over ``flat``. In fp64 every ``samples x value`` product of an
    fp32 tensor is exact and sums of a few of them are too, so the average does not depend on
    how clients are spread over ranks: any world size gives the same bits. fp32 halves the bytes;
    the sum order then changes the last bit. bf16: the values travel as bf16 (the local sum stays
    fp32 until the cast) and counts and stats in a second, small fp32 all_reduce: counts are sums
    of sample counts, which bf16 cannot hold exactly.
    """
    if not ctx.is_distributed:
        return 0
    if transport_dtype in ("fp64", "fp32"):
        ctx.all_reduce(buf.flat, what)
        return buf.flat.numel() * buf.flat.element_size()
    wire = buf.values.to(torch.bfloat16)
    ctx.all_reduce(wire, what + " (bf16 values)")
    ctx.all_reduce(buf.tail, what + " (counts)")
    buf.values.copy_(wire)
    return wire.numel() * 2 + buf.tail.numel() * buf.tail.element_size()
