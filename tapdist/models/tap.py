"""The TAP model: per-modality encoders, a gated transformer of MoTE/MoME/MoDE experts, and
task heads, all on one frozen backbone.

One instance is the union (server) model: it holds every component any task of the federation
uses. A client model is the subset of its trainable tensors that the client's tasks use, and the
same resident module runs any client once that client's state is loaded into it
(:meth:`TapModel.load_state`). Which tensors a task uses is computed from the structure
(:meth:`TapModel.component_names`), never traced.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tapdist.models.backbone import Backbone
from tapdist.models.heads import (
    ClassificationHead,
    ImageGenerationHead,
    TextGenerationHead,
)
from tapdist.models.layers import (
    Expert,
    GatedLayer,
    LoraSpec,
    Runs,
    attend,
    domain_runs,
    feed_forward,
)

MODALITIES = ("image", "text")
TASK_KINDS = ("image_cls", "text_cls", "image_gen", "text_gen")
SHARED = "shared"
PATHS = ("shared_shared", "shared_task", "mod_task", "mod_shared")


@dataclass(frozen=True)
class TaskSpec:
    """One modality-task pair a client trains: a dataset with its kind, inputs and domains."""

    name: str
    kind: str  # one of TASK_KINDS
    modalities: tuple[str, ...]
    domains: tuple[str, ...]
    classes: int = 0  # classification only

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(
                f"task '{self.name}': kind '{self.kind}' is unknown; accepted: "
                + ", ".join(TASK_KINDS)
            )
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(
                f"task '{self.name}': modalities {list(self.modalities)} must be a "
                f"non-empty subset of {', '.join(MODALITIES)}"
            )
        if not self.domains:
            raise ValueError(f"task '{self.name}' needs at least one domain")
        if self.kind.endswith("_cls") and self.classes < 2:
            raise ValueError(f"task '{self.name}' is a classification task: set classes >= 2")


@dataclass(frozen=True)
class TapSettings:
    """Architecture settings of the gated transformer (from the model config section)."""

    layers_per_block: int = 1
    paths: tuple[str, ...] = PATHS
    encoder_lora: LoraSpec = LoraSpec(8, 16, 0.3)
    expert_lora: LoraSpec = LoraSpec(4, 8, 0.3)
    attention_lora: LoraSpec = LoraSpec(16, 32, 0.3)
    mode_lora: LoraSpec = LoraSpec(4, 8, 0.3)
    answer_len: int = 8


@dataclass(frozen=True)
class Route:
    """One of the four paths for input modality ``m`` of a task of kind ``t``."""

    path: str
    shared_input: bool
    mote_block: str
    mote_expert: tuple[str, str]  # (m', t')
    mome_block: str
    mome_expert: tuple[str, str]  # (t', m')


def routes(kind: str, modality: str, paths: Iterable[str] = PATHS) -> list[Route]:
    m, t, s = modality, kind, SHARED
    table = {
        "shared_shared": Route("shared_shared", True, s, (s, s), s, (s, s)),
        "shared_task": Route("shared_task", True, m, (s, t), t, (t, s)),
        "mod_task": Route("mod_task", False, m, (m, t), t, (t, m)),
        "mod_shared": Route("mod_shared", False, m, (m, s), s, (s, m)),
    }
    return [table[p] for p in paths]


class Block(nn.Module):
    """A MoTE or MoME block: ``layers_per_block`` gated layers; each path through it brings its
    own experts (:meth:`TapModel.forward` runs every path of a task through them together)."""

    def __init__(self, bases, domains, settings: TapSettings):
        super().__init__()
        self.layers = nn.ModuleList(
            GatedLayer(b, domains, settings.attention_lora, settings.mode_lora) for b in bases
        )


class ImageEncoder(nn.Module):
    """64 x 64 image -> trainable adaptor -> upsample -> frozen tower (+LoRA) -> projection."""

    def __init__(self, tower: nn.Module, dim: int, hidden: int, resolution: int):
        super().__init__()
        self.tower = tower
        self.adaptor = nn.Conv2d(3, 3, 3, padding=1)
        nn.init.zeros_(self.adaptor.weight)  # starts as the identity (a residual adaptor)
        nn.init.zeros_(self.adaptor.bias)
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden))
        self.resolution = resolution

    def forward(self, batch: Mapping[str, torch.Tensor]):
        x = batch["image"]
        x = x + self.adaptor(x)
        x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        return self.proj(self.tower((x - 0.5) / 0.5)), None


class TextEncoder(nn.Module):
    def __init__(self, tower: nn.Module, dim: int, hidden: int):
        super().__init__()
        self.tower = tower
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden))

    def forward(self, batch: Mapping[str, torch.Tensor]):
        mask = batch["text_mask"]
        return self.proj(self.tower(batch["text"], mask)), mask


class TapModel(nn.Module):
    """The union model of a federation's tasks on one frozen backbone."""

    def __init__(self, backbone: Backbone, tasks: Iterable[TaskSpec], settings: TapSettings):
        super().__init__()
        self.tasks = {t.name: t for t in tasks}
        self.settings = settings
        self.domains = sorted({d for t in self.tasks.values() for d in t.domains})
        modalities = sorted({m for t in self.tasks.values() for m in t.modalities})
        n = settings.layers_per_block
        if len(backbone.bases) < 2 * n:
            raise ValueError(
                f"the backbone has {len(backbone.bases)} layers for the gated "
                f"transformer; layers_per_block = {n} needs {2 * n}"
            )
        hidden = backbone.hidden
        self.vocab_size = backbone.vocab_size  # token ids the model reads and writes
        self.max_text_len = backbone.max_text_len
        if backbone.fusion_in_towers:  # the text encoder's top layers, registered there...
            bases = backbone.bases[len(backbone.bases) - 2 * n :]
            # ...unless no task reads text: then register the frozen modules the layers use
            self.fusion = nn.ModuleList(
                [] if "text" in modalities else [nn.ModuleList(b.modules()) for b in bases]
            )
        else:  # registered once, only the 2n layers in use; every block and expert shares them
            bases = backbone.bases[: 2 * n]
            self.fusion = nn.ModuleList(backbone.layers[: 2 * n])
        self.bases = bases
        encoders = {
            "image": lambda: ImageEncoder(
                backbone.image_encoder, backbone.image_dim, hidden, backbone.resolution
            ),
            "text": lambda: TextEncoder(backbone.text_encoder, backbone.text_dim, hidden),
        }
        self.encoders = nn.ModuleDict({m: encoders[m]() for m in modalities})
        self.shared_proj = nn.Linear(hidden, hidden)
        self._build_gated(bases[:n], bases[n:])
        self.heads = nn.ModuleDict({t.name: self._head(t, backbone) for t in self.tasks.values()})
        self.register_load_state_dict_post_hook(_forget_parameters_after_load)

    def _build_gated(self, mote_bases, mome_bases) -> None:
        used = [
            r
            for t in self.tasks.values()
            for m in t.modalities
            for r in routes(t.kind, m, self.settings.paths)
        ]
        s, lora = self.settings, self.settings.expert_lora
        self.mote_blocks = nn.ModuleDict(
            {k: Block(mote_bases, self.domains, s) for k in sorted({r.mote_block for r in used})}
        )
        self.mome_blocks = nn.ModuleDict(
            {k: Block(mome_bases, self.domains, s) for k in sorted({r.mome_block for r in used})}
        )
        self.mote_experts = _expert_grid(mote_bases, {r.mote_expert for r in used}, lora)
        self.mome_experts = _expert_grid(mome_bases, {r.mome_expert for r in used}, lora)

    def _head(self, task: TaskSpec, backbone: Backbone) -> nn.Module:
        if task.kind.endswith("_cls"):
            return ClassificationHead(backbone.hidden, task.classes)
        if task.kind == "image_gen":
            return ImageGenerationHead(backbone.hidden)
        return TextGenerationHead(
            backbone.hidden, backbone.heads, backbone.vocab_size, self.settings.answer_len
        )

    # --- forward ------------------------------------------------------------------------------

    def forward(self, task: str, batch: Mapping[str, torch.Tensor]):
        """Head output and (B, paths, hidden) pooled path features for one task's batch.

        ``batch["domain"]`` holds each sample's index into :attr:`domains`; MoDE routes every
        sample by its own domain. ``batch["domain_runs"]``, when present, holds the same as runs
        of consecutive samples (:func:`~tapdist.models.layers.domain_runs`), known on the host.
        """
        spec = self.tasks[task]
        runs = batch.get("domain_runs") or domain_runs(batch["domain"])
        pooled = []
        for m in spec.modalities:
            tokens, mask = self.encoders[m](batch)
            x = self._gated(routes(spec.kind, m, self.settings.paths), tokens, mask, runs)
            pooled.append(_masked_mean(x, mask))
        paths = torch.cat(pooled).transpose(0, 1)
        return self.heads[task](paths.mean(dim=1), paths), paths

    def _gated(self, paths: list[Route], tokens, mask, runs: Runs) -> torch.Tensor:
        """Every path of one modality through MoTE and MoME, together: (paths, B, L, hidden).

        The first MoTE layer's attention runs once per distinct (input, block) pair: paths that
        share one (mod-task and mod-shared) part only at its FFN, where their experts differ.
        """
        starts = list(dict.fromkeys((r.shared_input, r.mote_block) for r in paths))
        inputs = {False: tokens}
        if any(shared for shared, _ in starts):
            inputs[True] = self.shared_proj(tokens)
        x = torch.stack([inputs[shared] for shared, _ in starts])
        fan = [starts.index((r.shared_input, r.mote_block)) for r in paths]
        stages = (
            (self.mote_blocks, self.mote_experts, [(r.mote_block, r.mote_expert) for r in paths]),
            (self.mome_blocks, self.mome_experts, [(r.mome_block, r.mome_expert) for r in paths]),
        )
        first = [name for _, name in starts]  # the first attention: once per start
        for blocks, experts, chosen in stages:
            for layer in range(self.settings.layers_per_block):
                names = first or [name for name, _ in chosen]
                x = attend([blocks[name].layers[layer] for name in names], x, mask, runs)
                if len(names) < len(paths):  # the paths that share a start part here
                    per_start = x.unbind()  # one stack in backward, not a zero-fill per path
                    x = torch.stack([per_start[start] for start in fan])  # no index to upload
                first = None
                x = feed_forward([experts[layer][a][b] for _, (a, b) in chosen], x)
        return x

    def loss(self, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out, _ = self(task, batch)
        return self.heads[task].loss(out, batch)

    # --- modes ---------------------------------------------------------------------------------

    @functools.cached_property
    def _mode_lists(self) -> tuple[tuple[nn.Module, ...], tuple[nn.Module, ...]]:
        """The submodules whose flag :meth:`train` sets itself, and those whose class has its
        own ``train`` (transformers' models), left to set their subtrees. The module tree is
        fixed when the model is built."""
        plain: dict[int, nn.Module] = {}
        own: dict[int, nn.Module] = {}

        def walk(module: nn.Module) -> None:
            for child in module.children():
                if id(child) in plain or id(child) in own:
                    continue
                if type(child).train is nn.Module.train:
                    plain[id(child)] = child
                    walk(child)
                else:
                    own[id(child)] = child

        walk(self)
        return tuple(plain.values()), tuple(own.values())

    def train(self, mode: bool = True) -> TapModel:
        """``nn.Module.train``, with the flags set from a flat list: the recursive walk through
        ``nn.Module.__setattr__`` costs 2-6 ms on the union model (900 to 3,000 modules), and
        each client-round switches modes several times. A submodule whose class overrides
        ``train`` still gets its own call. ``eval()`` comes here too."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        plain, own = self._mode_lists
        object.__setattr__(self, "training", mode)
        for module in plain:
            object.__setattr__(module, "training", mode)
        for module in own:
            module.train(mode)
        return self

    # --- trainable state -----------------------------------------------------------------------

    @functools.cached_property
    def _trainable(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by name, in the union order. Which ones are trainable is
        fixed when the model is built; a client's state is loaded and read back by these names
        several times per client-round, and walking the module tree for them each time cost a
        fifth of a small client's round."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def _forget_parameters(self) -> None:
        self.__dict__.pop("_trainable", None)

    def _apply(self, fn, recurse=True):
        self._forget_parameters()  # a conversion (``.to``, ...) may replace parameter objects
        return super()._apply(fn, recurse)

    def trainable_names(self) -> list[str]:
        """Every trainable tensor of the union model, in a fixed order."""
        return list(self._trainable)

    def trainable_parameters(self, names: Iterable[str]) -> list[nn.Parameter]:
        """The resident parameters ``names`` name (trainable tensors of the union model)."""
        names, params = list(names), self._trainable
        _check_names(names, params)
        return [params[n] for n in names]

    def component_names(self, task: str) -> list[str]:
        """The trainable tensors task ``task``'s forward touches, from the structure alone."""
        spec = self.tasks[task]
        prefixes = {f"heads.{task}."} | {f"encoders.{m}." for m in spec.modalities}
        for m in spec.modalities:
            for r in routes(spec.kind, m, self.settings.paths):
                if r.shared_input:
                    prefixes.add("shared_proj.")
                prefixes |= self._block_prefixes(f"mote_blocks.{r.mote_block}", spec.domains)
                prefixes |= self._block_prefixes(f"mome_blocks.{r.mome_block}", spec.domains)
                for layer in range(self.settings.layers_per_block):
                    prefixes.add(f"mote_experts.{layer}.{'.'.join(r.mote_expert)}.")
                    prefixes.add(f"mome_experts.{layer}.{'.'.join(r.mome_expert)}.")
        return [n for n in self.trainable_names() if any(n.startswith(p) for p in prefixes)]

    def client_names(self, tasks: Iterable[str]) -> list[str]:
        """A client's trainable tensors: the union of its tasks' components, in union order."""
        wanted = {n for t in tasks for n in self.component_names(t)}
        return [n for n in self.trainable_names() if n in wanted]

    def get_state(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Detached copies of the named trainable tensors (all of them by default)."""
        names = self.trainable_names() if names is None else list(names)
        return {n: p.detach().clone() for n, p in zip(names, self.trainable_parameters(names))}

    def load_state(self, state: Mapping[str, torch.Tensor], names: Iterable[str]) -> None:
        """Copy ``state`` into the resident module; its keys must be exactly ``names``."""
        names = list(names)
        params = self.trainable_parameters(names)
        missing, unexpected = set(names) - set(state), set(state) - set(names)
        if missing or unexpected:
            raise KeyError(
                f"state does not match: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        with torch.no_grad():
            for n, param in zip(names, params):
                param.copy_(state[n])

    def _block_prefixes(self, block: str, domains: Iterable[str]) -> set[str]:
        out = set()
        for layer in range(self.settings.layers_per_block):
            base = f"{block}.layers.{layer}."
            out |= {base + "lora_q.", base + "lora_v."}
            for d in domains:
                out |= {f"{base}mode_q.experts.{d}.", f"{base}mode_v.experts.{d}."}
        return out


def _expert_grid(bases, keys: set[tuple[str, str]], lora: LoraSpec) -> nn.ModuleList:
    """experts[layer][a][b] for every (a, b) some path uses; layer l shares base l."""
    grid = nn.ModuleList()
    for base in bases:
        level = nn.ModuleDict()
        for a, b in sorted(keys):
            level[a] = level[a] if a in level else nn.ModuleDict()
            level[a][b] = Expert(base, lora)
        grid.append(level)
    return grid


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens (dim -2) of ``x`` (..., B, L, hidden) where ``mask`` (B, L) is set."""
    if mask is None:
        return x.mean(dim=-2)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=-2) / weights.sum(dim=-2).clamp_min(1.0)


def _forget_parameters_after_load(model: TapModel, incompatible_keys) -> None:
    """After ``load_state_dict``: with ``assign=True`` it put new parameter objects in place."""
    model._forget_parameters()


def _check_names(names: list[str], known: Collection[str]) -> None:
    unknown = sorted(n for n in set(names) if n not in known)
    if unknown:
        raise KeyError(f"not trainable tensors of the union model: {unknown}")
