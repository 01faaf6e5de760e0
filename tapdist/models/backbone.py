"""The frozen backbone, loaded once per process: FLAVA or ViLT, from a local directory or a config.

:func:`load_backbone` returns the pieces TAP builds on: one frozen encoder per modality and the
backbone layers the gated transformer takes its attention and FFN bases from. Everything here is
frozen; LoRA is added by the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tapdist.models.layers import LayerBase, LoraSpec, tower_layer

BACKBONES = ("flava", "vilt", "hf")
SIZES = ("tiny", "full")
# Tiny: a configuration of the real architecture small enough for tests (hidden 32, 2 layers).
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@dataclass
class Backbone:
    """Frozen parts of a loaded backbone."""

    kind: str
    image_encoder: nn.Module  # pixels (B, 3, R, R) -> tokens (B, N, image_dim)
    text_encoder: nn.Module  # (ids (B, T), mask (B, T)) -> tokens (B, T, text_dim)
    layers: nn.ModuleList  # backbone layers the gated transformer is built from
    bases: list[LayerBase]  # frozen views of ``layers``
    image_dim: int
    text_dim: int
    hidden: int
    heads: int
    resolution: int  # input resolution of the image encoder
    vocab_size: int
    max_text_len: int
    fusion_in_towers: bool = False  # the gated layers are the text tower's top layers


def load_backbone(
    kind: str,
    size: str = "tiny",
    pretrained: str = "",
    encoder_lora: LoraSpec | None = None,
    text_dir: str = "",
    vision_dir: str = "",
    sizes: dict[str, int] | None = None,
) -> Backbone:
    """Build (``size``) or load (``pretrained`` directory) a backbone; every weight frozen.

    ``hf`` pairs separate Hugging Face text and vision encoders, each loaded from a local
    directory (``text_dir``, ``vision_dir``) or built tiny; the gated transformer then starts
    from the text encoder's top layers.
    """
    if kind not in BACKBONES:
        raise ValueError(f"backbone '{kind}' is unknown; accepted: {', '.join(BACKBONES)}")
    if kind == "hf":
        backbone = _hf(size, text_dir, vision_dir, encoder_lora, sizes or {})
    else:
        builder = _flava if kind == "flava" else _vilt
        backbone = builder(size, pretrained, encoder_lora, sizes or {})
    for module in (backbone.image_encoder, backbone.text_encoder, backbone.layers):
        for name, param in module.named_parameters():
            param.requires_grad_("lora_" in name)
    return backbone


class MatmulWeights:
    """Copies, in the dtype autocast computes in, of a model's frozen linear and convolution
    weights and biases (the frozen weights only matmuls read), swapped in while it computes.

    Autocast keeps a cast copy only of trainable weights; a frozen weight is cast again at each
    use, every micro-batch. The originals stay in place outside :meth:`swapped_in` (evaluation
    reads them in fp32). Inside, results are bit for bit those of autocast's own casts. A
    backward must run inside too: an operator may have saved the weight it read.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.params = [
            p
            for module in model.modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
            for p in module.parameters(recurse=False)
            if not p.requires_grad
        ]
        self.copies = [p.detach().to(dtype) for p in self.params]
        self._sources = [_source(p) for p in self.params]
        self._active = False

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        if self._active:  # nested: already in place
            yield
            return
        if any(_source(p) != s for p, s in zip(self.params, self._sources)):
            raise RuntimeError(
                "frozen weights were moved or overwritten after their bf16 copies were made; "
                "build a new LocalTrainer for the model as it is now"
            )
        originals = [p.data for p in self.params]
        for p, copy in zip(self.params, self.copies):
            p.data = copy
        self._active = True
        try:
            yield
        finally:
            for p, original in zip(self.params, originals):
                p.data = original
            self._active = False


def _source(p: torch.Tensor) -> tuple:
    """Where a tensor's values live and how often they were written in place."""
    return p.data_ptr(), p._version, p.device, p.dtype


def hf_config(kind: str, size: str, sizes: dict[str, int] | None = None):
    """The Hugging Face config of a FLAVA or ViLT backbone of ``size`` (full: the defaults),
    with explicit ``sizes`` (hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size) overriding the preset in every transformer of the backbone."""
    from transformers import FlavaConfig, ViltConfig

    tiny = size == "tiny"
    layer = dict(_TINY if tiny else {}, **(sizes or {}))
    if kind == "flava":
        hidden = layer.get("hidden_size", 768)
        image = dict(layer, image_size=32, patch_size=8) if tiny else layer
        text = dict(layer, vocab_size=1000, max_position_embeddings=64) if tiny else layer
        return FlavaConfig(
            image_config=image,
            text_config=text,
            multimodal_config=layer,
            hidden_size=hidden,
            projection_dim=hidden,
        )
    extra = dict(image_size=32, patch_size=8, vocab_size=1000, max_position_embeddings=40)
    return ViltConfig(**layer, **(extra if tiny else {}))


def _flava(size: str, pretrained: str, lora: LoraSpec | None, sizes: dict) -> Backbone:
    from transformers import FlavaModel

    model = (
        _fp32(FlavaModel.from_pretrained(pretrained))
        if pretrained
        else FlavaModel(hf_config("flava", size, sizes))
    )
    cfg = model.config
    image, text = model.image_model, model.text_model
    if lora is not None and lora.rank > 0:
        _inject_qv_lora(image, lora)
        _inject_qv_lora(text, lora)
    layers = model.multimodal_model.encoder.layer
    return Backbone(
        "flava",
        _FlavaImage(image, cfg.image_config),
        _FlavaText(text, cfg.text_config),
        layers,
        [_hf_layer_base(layer, cfg.multimodal_config) for layer in layers],
        cfg.image_config.hidden_size,
        cfg.text_config.hidden_size,
        cfg.multimodal_config.hidden_size,
        cfg.multimodal_config.num_attention_heads,
        cfg.image_config.image_size,
        cfg.text_config.vocab_size,
        cfg.text_config.max_position_embeddings,
    )


def _vilt(size: str, pretrained: str, lora: LoraSpec | None, sizes: dict) -> Backbone:
    from transformers import ViltModel

    model = (
        _fp32(ViltModel.from_pretrained(pretrained))
        if pretrained
        else ViltModel(hf_config("vilt", size, sizes))
    )
    cfg = model.config
    layers = model.encoder.layer
    # ViLT's towers are its embeddings: 224-pixel inputs give 7 x 7 patches of 32 (TAP's setting)
    resolution = 224 if size == "full" or pretrained else cfg.image_size
    image = _ViltImage(model.embeddings, cfg.patch_size, resolution, lora)
    return Backbone(
        "vilt",
        image,
        _ViltText(model.embeddings.text_embeddings),
        layers,
        [_hf_layer_base(layer, cfg) for layer in layers],
        cfg.hidden_size,
        cfg.hidden_size,
        cfg.hidden_size,
        cfg.num_attention_heads,
        resolution,
        cfg.vocab_size,
        cfg.max_position_embeddings,
    )


def _hf(size: str, text_dir: str, vision_dir: str, lora: LoraSpec | None, sizes: dict) -> Backbone:
    from transformers import AutoModel, BertConfig, BertModel, ViTConfig, ViTModel

    if size != "tiny" and not (text_dir and vision_dir):
        raise ValueError(
            "backbone hf needs model.text_encoder and model.vision_encoder directories "
            "(or model.size=tiny to build both from configs)"
        )
    if text_dir:
        text = _from_dir(AutoModel, text_dir)
    else:
        tiny = BertConfig(**dict(_TINY, **sizes), vocab_size=1000, max_position_embeddings=64)
        text = BertModel(tiny, add_pooling_layer=False)
    if vision_dir:
        vision = _from_dir(AutoModel, vision_dir)
    else:
        vit = ViTConfig(**dict(_TINY, **sizes), image_size=32, patch_size=8)
        vision = ViTModel(vit, add_pooling_layer=False)
    tcfg, vcfg = text.config, vision.config
    # The gated transformer starts from the text encoder's top layers (TapModel picks them).
    bases = [_bert_layer_base(layer, tcfg) for layer in text.encoder.layer]  # before LoRA
    if lora is not None and lora.rank > 0:
        _inject_qv_lora(vision, lora)
        _inject_qv_lora(text, lora)
    return Backbone(
        "hf",
        _TowerImage(vision),
        _TowerText(text),
        nn.ModuleList(),  # the layers stay registered in the text tower
        bases,
        vcfg.hidden_size,
        tcfg.hidden_size,
        tcfg.hidden_size,
        tcfg.num_attention_heads,
        vcfg.image_size,
        tcfg.vocab_size,
        tcfg.max_position_embeddings,
        fusion_in_towers=True,
    )


def _from_dir(auto, directory: str) -> nn.Module:
    """An encoder from a local directory, without the pooler TAP never reads."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected, not news
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per rank per encoder is noise in a job log
    try:
        return _fp32(auto.from_pretrained(directory, add_pooling_layer=False))
    except TypeError:  # architectures without a pooler option
        return _fp32(auto.from_pretrained(directory))
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _fp32(model: nn.Module) -> nn.Module:
    # transformers 5 keeps the dtype weights were saved in; LoRA and projections are fp32
    return model.float()


def _bert_layer_base(layer: nn.Module, cfg) -> LayerBase:
    """A post-LN BERT layer read as pre-LN: its two LayerNorms become the input norms."""
    attn = layer.attention
    return LayerBase(
        attn.output.LayerNorm,
        attn.self.query,
        attn.self.key,
        attn.self.value,
        attn.output.dense,
        layer.output.LayerNorm,
        layer.intermediate.dense,
        layer.output.dense,
        layer.intermediate.intermediate_act_fn,
        cfg.num_attention_heads,
    )


def _inject_qv_lora(tower: nn.Module, lora: LoraSpec) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    # query/value: BERT, FLAVA, transformers-4 ViT; q_proj/v_proj: transformers-5 ViT
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=["query", "value", "q_proj", "v_proj"],
    )
    inject_adapter_in_model(config, tower)
    for module in tower.modules():  # autocast decides the LoRA's dtype, as for the base layer
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def _hf_layer_base(layer: nn.Module, cfg) -> LayerBase:
    """FLAVA and ViLT layers share BERT/ViT naming: attention.attention.{query,key,value}."""
    attn = layer.attention
    return LayerBase(
        layer.layernorm_before,
        attn.attention.query,
        attn.attention.key,
        attn.attention.value,
        attn.output.dense,
        layer.layernorm_after,
        layer.intermediate.dense,
        layer.output.dense,
        layer.intermediate.intermediate_act_fn,
        cfg.num_attention_heads,
    )


class _TowerImage(nn.Module):
    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _hidden(self.tower(pixel_values=pixels))


class _TowerText(nn.Module):
    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _hidden(self.tower(input_ids=ids, attention_mask=mask))


class _FlavaTower(nn.Module):
    """A FLAVA image or text encoder: its embeddings, weights and LoRA, run layer by layer by
    :func:`~tapdist.models.layers.tower_layer` with fused attention (transformers runs FLAVA's
    attention eagerly: scores, mask, softmax and weights as separate kernels)."""

    def __init__(self, tower: nn.Module, cfg):
        super().__init__()
        self.tower = tower
        self._bases = tuple(_hf_layer_base(layer, cfg) for layer in tower.encoder.layer)
        self.dropout = (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob)

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dropout, attn_dropout = self.dropout if self.training else (0.0, 0.0)
        mask = None if mask is None else mask.bool()  # once, not in every layer
        for base in self._bases:
            x = tower_layer(base, x, mask, dropout, attn_dropout)
        return self.tower.layernorm(x)


class _FlavaImage(_FlavaTower):
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode(self.tower.embeddings(pixels), None)


class _FlavaText(_FlavaTower):
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encode(self.tower.embeddings(input_ids=ids), mask)


def _hidden(output) -> torch.Tensor:
    # transformers 4 and 5 both return an output object here; older code paths return tuples
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


class _ViltImage(nn.Module):
    """ViLT's patch projection and position embeddings; LoRA on the projection (as a linear map
    of flattened patches, which is what a stride-P, kernel-P convolution is)."""

    def __init__(self, embeddings: nn.Module, patch: int, resolution: int, lora: LoraSpec | None):
        super().__init__()
        self.patch = patch
        self.proj = embeddings.patch_embeddings.projection
        grid = resolution // patch
        pos = embeddings.position_embeddings.detach()[:, 1:]  # drop the CLS position
        side = int(pos.shape[1] ** 0.5)
        pos = pos.transpose(1, 2).reshape(1, -1, side, side)
        pos = F.interpolate(pos, size=(grid, grid), mode="bilinear", align_corners=True)
        self.register_buffer("pos", pos.flatten(2).transpose(1, 2).contiguous(), persistent=False)
        d_in = 3 * patch * patch
        self.lora = lora.make(d_in, self.proj.out_channels) if lora is not None else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(pixels).flatten(2).transpose(1, 2)
        if self.lora is not None:
            patches = F.unfold(pixels, self.patch, stride=self.patch).transpose(1, 2)
            tokens = tokens + self.lora(patches)
        return tokens + self.pos


class _ViltText(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
