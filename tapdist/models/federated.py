"""The TAP model and its federation, as the round loop sees them (registered as ``tap``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tapdist.config import MODEL_DIRECTORIES, Config, ConfigError
from tapdist.data.spec import ClientSpec, parse_clients, parse_tasks
from tapdist.data.synthetic import make_task_data
from tapdist.local import LocalTrainer
from tapdist.models.backbone import load_backbone
from tapdist.models.base import ClientInfo, State
from tapdist.models.layers import LoraSpec
from tapdist.models.tap import PATHS, TapModel, TapSettings, TaskSpec
from tapdist.registry import MODELS
from tapdist.resources import resolve


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


def build_union_model(
    cfg: Config,
    device: torch.device | str = "cpu",
    tasks: list[TaskSpec] | None = None,
    vocab_size: int = 0,
) -> TapModel:
    """The union (server) model of ``tasks`` (default: ``cfg``'s), initialised from
    ``run.seed``; ``vocab_size`` (default: the tokenizer's, else the text encoder's) sizes the
    text-generation heads."""
    settings = settings_from(cfg)
    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    sizes = {
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "intermediate_size": m.intermediate_size,
    }
    base = Path(cfg.source).parent if cfg.source else None
    local = {k: str(resolve(v, base)) if v else "" for k, v in _directories(m).items()}
    _check_directories(m.backbone, local)
    backbone = load_backbone(
        m.backbone,
        m.size,
        local["pretrained"],
        settings.encoder_lora,
        local["text_encoder"],
        local["vision_encoder"],
        {k: v for k, v in sizes.items() if v},
    )
    if local["tokenizer"] and not vocab_size:
        vocab_size = tokenizer_vocab(local["tokenizer"])
    if vocab_size:
        backbone.vocab_size = _checked_vocab(vocab_size, backbone.vocab_size)
    tasks = parse_tasks(cfg.data) if tasks is None else tasks
    return TapModel(backbone, tasks, settings).to(device)


def _directories(m) -> dict[str, str]:
    return {k: getattr(m, k) for k in MODEL_DIRECTORIES}


def _check_directories(backbone: str, local: dict[str, str]) -> None:
    """Each local directory the model config names must exist and hold what it is for."""
    needs = {
        "pretrained": ("config.json",),
        "text_encoder": ("config.json",),
        "vision_encoder": ("config.json",),
        "tokenizer": ("vocab.txt", "tokenizer.json"),
    }
    for key, path in local.items():
        if not path:
            continue
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"model.{key} = {path}: no such directory; give a local folder")
        if not any((folder / name).is_file() for name in needs[key]):
            raise ConfigError(
                f"model.{key} = {path} holds no {' or '.join(needs[key])}; give the folder "
                "that save_pretrained wrote"
            )
    if local["pretrained"]:
        config = Path(local["pretrained"]) / "config.json"
        kind = json.loads(config.read_text(encoding="utf-8")).get("model_type", "?")
        if kind != backbone:
            raise ConfigError(
                f"model.pretrained = {local['pretrained']} holds a '{kind}' model but "
                f"model.backbone = {backbone}; give a {backbone} checkpoint or change the backbone"
            )


def _checked_vocab(size: int, encoder_vocab: int) -> int:
    if size > encoder_vocab:
        raise ConfigError(
            f"the tokenizer has {size} tokens but the text encoder embeds only "
            f"{encoder_vocab}; use the backbone's own tokenizer"
        )
    return size


def tokenizer_vocab(directory: str) -> int:
    """Vocabulary size of the (BERT WordPiece) tokenizer in ``directory``."""
    from transformers import BertTokenizerFast

    return len(BertTokenizerFast.from_pretrained(directory))


class TapFederation:
    """One resident union model; each client is a list of tensor names and its data.

    Data comes from ``data.source``: ``synthetic`` generates each client's samples from (seed,
    client, task) on first use; ``hdf5`` reads them from a federation file. Either way a rank
    loads only the clients it hosts, as ready tensors.
    """

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, torch.device(device)
        if cfg.data.source == "hdf5":
            from tapdist.data.hdf5 import read_meta

            self.file = _federation_file(cfg)
            meta = read_meta(self.file)
            _check_file_fits(cfg, meta)
            self.model = build_union_model(cfg, device, meta.tasks, meta.vocab_size)
            self.specs = [
                ClientSpec(c.id, c.tasks, sum(c.train.values()), sum(c.test.values()))
                for c in meta.clients
            ]
            self.sizes = [spec.samples for spec in self.specs]  # the file's totals
            self.text_len = meta.text_len
        else:
            self.file = None
            self.model = build_union_model(cfg, device)
            self.specs = parse_clients(cfg.data, list(self.model.tasks.values()))
            self.sizes = [spec.samples * len(spec.tasks) for spec in self.specs]  # per task
            self.text_len = cfg.data.text_len
        self._check_text_len()
        self.trainer = LocalTrainer(self.model, cfg.train, self.device)
        self._initial = self.model.get_state()
        self._keys = [self.model.client_names(c.tasks) for c in self.specs]
        self._data: dict[
            tuple[int, str], dict
        ] = {}  # built on first use: a rank needs only its clients

    def _check_text_len(self) -> None:
        limit = self.model.max_text_len
        reads_text = any("text" in t.modalities for t in self.model.tasks.values())
        if self.text_len > limit and reads_text:
            source = f"data.text_len = {self.text_len}"
            if self.file is not None:
                source = f"{self.file} holds texts of {self.text_len} tokens, which"
            raise ConfigError(
                f"{source} exceeds the text encoder's {limit} positions; accepted: 2..{limit}"
            )

    # --- data ---------------------------------------------------------------------------------

    def train_data(self, client: int) -> dict[str, dict[str, torch.Tensor]]:
        return self._split(client, "train")

    def test_data(self, client: int) -> dict[str, dict[str, torch.Tensor]]:
        return self._split(client, "test")

    def _split(self, client: int, split: str) -> dict[str, dict[str, torch.Tensor]]:
        key = (client, split)
        if key not in self._data:
            if self.file is not None:
                from tapdist.data.hdf5 import read_client

                self._data[key] = read_client(self.file, client, split, self.model.domains)
            else:
                self._data[key] = self._synthetic(self.specs[client], split)
        return self._data[key]

    def _synthetic(self, c: ClientSpec, split: str) -> dict[str, dict[str, torch.Tensor]]:
        cfg, model = self.cfg, self.model
        count, stream = (c.samples, 0) if split == "train" else (c.test, 1)
        return {
            t: make_task_data(
                model.tasks[t],
                count,
                self.text_len,
                model.vocab_size,
                cfg.model.answer_len,
                model.domains,
                (cfg.run.seed, c.id, i, stream),
            )
            for i, t in enumerate(c.tasks)
        }

    # --- states -------------------------------------------------------------------------------

    def clients(self) -> list[ClientInfo]:
        """Every client with its training samples over all its tasks (its averaging weight)."""
        return [ClientInfo(c.id, size, c.tasks) for c, size in zip(self.specs, self.sizes)]

    def task_kinds(self) -> dict[str, str]:
        return {name: t.kind for name, t in self.model.tasks.items()}

    def union_shapes(self) -> dict[str, torch.Size]:
        return {n: t.shape for n, t in self._initial.items()}

    def client_keys(self, client: int) -> list[str]:
        return self._keys[client]

    def task_keys(self, client: int, task: str) -> list[str]:
        if task not in self.specs[client].tasks:
            raise KeyError(f"client {client} has no task '{task}'")
        return self.model.component_names(task)

    def initial_state(self) -> State:
        return {n: t.clone() for n, t in self._initial.items()}

    def initial_substate(self, client: int) -> State:
        return {n: self._initial[n].clone() for n in self._keys[client]}

    def evaluate(self, client: int, state: State) -> dict[str, dict[str, float]]:
        from tapdist.evaluate import evaluate

        self.model.load_state(state, self._keys[client])
        data = self.test_data(client)
        return evaluate(self.model, list(data), data, self.cfg.train.eval_batch_size, self.device)

    def mod_task_slots(self) -> dict[str, list[tuple[str, int]]]:
        """Per task, (modality, index) of each mod-task path feature in ``forward``'s paths."""
        paths = self.model.settings.paths
        if "mod_task" not in paths:
            raise ConfigError("DisentAFL needs the mod_task path; add it to model.paths")
        slot = paths.index("mod_task")
        return {
            name: [(m, i * len(paths) + slot) for i, m in enumerate(t.modalities)]
            for name, t in self.model.tasks.items()
        }


def _federation_file(cfg: Config) -> Path:
    if not cfg.data.path:
        raise ConfigError(
            "data.source = hdf5 needs data.path: the federation file (build one with "
            "`tapdist data build SPEC --out FILE`)"
        )
    base = Path(cfg.source).parent if cfg.source else None
    return resolve(cfg.data.path, base)


def _check_file_fits(cfg: Config, meta) -> None:
    """A config that lists tasks or clients must agree with the federation file it reads (the
    file's sample counts are the real ones: listed counts are not compared)."""
    where = f"the federation file {meta.path}"
    if cfg.data.tasks:
        listed = {t.name: t for t in parse_tasks(cfg.data)}
        in_file = {t.name: t for t in meta.tasks}
        if listed != in_file:
            differ = sorted(
                n for n in listed.keys() | in_file.keys() if listed.get(n) != in_file.get(n)
            )
            how = {
                "not in the file": sorted(listed.keys() - in_file.keys()),
                "not in the config": sorted(in_file.keys() - listed.keys()),
                "defined otherwise": sorted(set(differ) & listed.keys() & in_file.keys()),
            }
            detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in how.items() if v)
            raise ConfigError(
                f"data.tasks do not match the tasks of {where}: {', '.join(differ)} differ "
                f"({detail}); fix the config or remove data.tasks to use the file's"
            )
    if cfg.data.clients:
        listed = [tuple(c.get("tasks", ())) for c in cfg.data.clients]
        in_file = [c.tasks for c in meta.clients]
        if listed != in_file:
            raise ConfigError(
                f"data.clients do not match the clients of {where} ({len(in_file)} clients: "
                f"{[list(t) for t in in_file]}); fix the config or remove data.clients"
            )
    answer_len = cfg.model.answer_len
    if meta.answer_len != answer_len and any(t.kind == "text_gen" for t in meta.tasks):
        raise ConfigError(
            f"model.answer_len = {answer_len} but {where} holds answers of "
            f"{meta.answer_len} tokens; set model.answer_len = {meta.answer_len}"
        )


@MODELS.register("tap")
def build(cfg: Config, device: torch.device) -> TapFederation:
    return TapFederation(cfg, device)
