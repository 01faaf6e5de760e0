"""The TAP model and its federation, as the round loop sees them (registered as ``tap``)."""

from __future__ import annotations

import torch

from tapdist.config import Config, ConfigError
from tapdist.data.spec import parse_clients, parse_tasks
from tapdist.data.synthetic import make_task_data
from tapdist.local import train_locally
from tapdist.models.backbone import load_backbone
from tapdist.models.base import ClientInfo
from tapdist.models.layers import LoraSpec
from tapdist.models.tap import PATHS, TapModel, TapSettings
from tapdist.registry import MODELS


def settings_from(cfg: Config) -> TapSettings:
    m = cfg.model
    bad = [p for p in m.paths if p not in PATHS]
    if bad or not m.paths:
        raise ConfigError(f"model.paths = {m.paths}: a non-empty subset of {', '.join(PATHS)}")
    return TapSettings(
        layers_per_block=m.layers_per_block,
        paths=tuple(m.paths),
        encoder_lora=LoraSpec(m.encoder_lora_rank, m.encoder_lora_alpha, m.lora_dropout),
        expert_lora=LoraSpec(m.expert_lora_rank, m.expert_lora_alpha, m.lora_dropout),
        attention_lora=LoraSpec(m.attention_lora_rank, m.attention_lora_alpha, m.lora_dropout),
        mode_lora=LoraSpec(m.mode_lora_rank, m.mode_lora_alpha, m.lora_dropout),
        answer_len=m.answer_len,
    )


def build_union_model(cfg: Config, device: torch.device | str = "cpu") -> TapModel:
    """The union (server) model of ``cfg``'s tasks, initialised from ``run.seed``."""
    settings = settings_from(cfg)
    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    sizes = {
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "intermediate_size": m.intermediate_size,
    }
    backbone = load_backbone(
        m.backbone,
        m.size,
        m.pretrained,
        settings.encoder_lora,
        m.text_encoder,
        m.vision_encoder,
        {k: v for k, v in sizes.items() if v},
    )
    if m.tokenizer:
        backbone.vocab_size = tokenizer_vocab(m.tokenizer, backbone.vocab_size)
    return TapModel(backbone, parse_tasks(cfg.data), settings).to(device)


def tokenizer_vocab(directory: str, encoder_vocab: int) -> int:
    """Vocabulary size of the tokenizer in ``directory``; the text encoder must cover it."""
    from transformers import BertTokenizerFast

    size = len(BertTokenizerFast.from_pretrained(directory))
    if size > encoder_vocab:
        raise ConfigError(
            f"model.tokenizer {directory} has {size} tokens but the text encoder "
            f"embeds only {encoder_vocab}; use the backbone's own tokenizer"
        )
    return size


class TapFederation:
    """One resident union model; each client is a list of tensor names and its data."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.model = build_union_model(cfg, device)
        tasks = list(self.model.tasks.values())
        self.specs = parse_clients(cfg.data, tasks)
        self._initial = self.model.get_state()
        self._keys = [self.model.client_names(c.tasks) for c in self.specs]
        self._data: dict[int, dict] = {}  # built on first use: a rank needs only its clients
        limit = self.model.max_text_len
        if cfg.data.text_len > limit and any("text" in t.modalities for t in tasks):
            raise ConfigError(
                f"data.text_len = {cfg.data.text_len} exceeds the text encoder's "
                f"{limit} positions; accepted: 2..{limit}"
            )

    def client_data(self, client: int) -> dict[str, dict[str, torch.Tensor]]:
        """The client's samples per task, generated from (seed, client, task) on first use."""
        if client not in self._data:
            c, cfg = self.specs[client], self.cfg
            self._data[client] = {
                t: make_task_data(
                    self.model.tasks[t],
                    c.samples,
                    cfg.data.text_len,
                    self.model.vocab_size,
                    cfg.model.answer_len,
                    self.model.domains,
                    (cfg.run.seed, c.id, i),
                )
                for i, t in enumerate(c.tasks)
            }
        return self._data[client]

    def clients(self) -> list[ClientInfo]:
        return [ClientInfo(c.id, c.samples * len(c.tasks), "+".join(c.tasks)) for c in self.specs]

    def union_shapes(self) -> dict[str, torch.Size]:
        return {n: t.shape for n, t in self._initial.items()}

    def client_keys(self, client: int) -> list[str]:
        return self._keys[client]

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self._initial.items()}

    def local_train(self, client: int, state, generator: torch.Generator):
        return train_locally(
            self.model,
            self._keys[client],
            state,
            self.client_data(client),
            self.cfg.train,
            generator,
        )


@MODELS.register("tap")
def build(cfg: Config, device: torch.device) -> TapFederation:
    return TapFederation(cfg, device)
