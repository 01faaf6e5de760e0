"""Typed run configuration: one dataclass per YAML section, dotted overrides.

A config file is a YAML mapping of sections (``run``, ``model``, ``federation``, ...), each a
mapping of keys. Every key is declared below with its type, default, accepted values and help
text; an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError` naming the
section, the key and what is accepted. ``--set federation.rounds=5`` overrides one key after the
file is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# Fixed value sets of list keys. They are defined where they are used (tapdist.models.tap.PATHS,
# tapdist.fl.algorithms.ABLATIONS), which import torch; tests/test_config.py keeps these equal.
PATHS = ("shared_shared", "shared_task", "mod_task", "mod_shared")
ABLATIONS = ("no_distillation", "double_finetune")
_DIRECTORY = (
    ": a local folder (a relative path is read from the config file's folder) or "
    "package:NAME/PATH (a folder inside an installed Python package)"
)


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    items: type = str,
) -> Any:
    """Declare a config key: its default, help text and accepted values. For a list, ``items``
    is the type of its elements, ``choices`` the values each element may take and ``min`` its
    least length."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "items": items}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Identity of a run: name, seed, output folder, plugins, checkpoints."""

    name: str = option("tapdist", "run name; the default run folder is runs/<name>")
    seed: int = option(41, "seed of every random choice (client sampling, init, batches)", min=0)
    run_dir: str = option("", "output folder; empty means runs/<name>")
    plugins: list = option(
        [],
        "Python modules or .py files (relative to the config file) "
        "imported at start; they may register models and algorithms",
    )
    log_level: str = option(
        "info", "log level of the server rank", choices=("debug", "info", "warning", "error")
    )
    log_all_ranks: bool = option(False, "let every rank log at log_level, not only the server")
    log_files: bool = option(
        False,
        "every rank also writes its log records at log_level to RUN_DIR/logs/rank-NNNN.log "
        "(appended to across resumes)",
    )
    tensorboard: bool = option(
        False,
        "the server also writes each round's metrics as TensorBoard scalars to "
        "RUN_DIR/tensorboard/<algorithm>/ (pip install 'tapdist[tensorboard]')",
    )
    checkpoint_every: int = option(
        10, "write a checkpoint every this many rounds (and always after the last round)", min=1
    )
    keep_checkpoints: int = option(2, "complete checkpoints kept; older ones are removed", min=1)
    rounds_per_job: int = option(
        0,
        "end the job cleanly after this many rounds, with a checkpoint, for queues with a time "
        "limit; `tapdist train CONFIG --resume RUN_DIR` continues (0: run every round)",
        min=0,
    )


#: the model keys that name local directories (relative ones resolve from the config's folder)
MODEL_DIRECTORIES = ("pretrained", "text_encoder", "vision_encoder", "tokenizer")


@dataclass
class ModelConfig:
    """Which model the federation trains; for TAP, its backbone and gated-transformer sizes."""

    name: str = option("tap", "registered model name (see `tapdist models`)")
    backbone: str = option(
        "flava",
        "frozen backbone: FLAVA, ViLT, or hf (separate Hugging Face text and vision encoders)",
        choices=("flava", "vilt", "hf"),
    )
    size: str = option(
        "full",
        "backbone size when built from its config (random init); tiny "
        "is hidden 32, 2 layers, for tests",
        choices=("full", "tiny"),
    )
    hidden_size: int = option(0, "explicit backbone width (0: the size preset's)", min=0)
    num_layers: int = option(0, "explicit layers per backbone transformer (0: preset)", min=0)
    num_heads: int = option(0, "explicit attention heads (0: the size preset's)", min=0)
    intermediate_size: int = option(0, "explicit FFN width (0: the size preset's)", min=0)
    pretrained: str = option(
        "",
        "directory with pretrained backbone weights (from_pretrained)"
        + _DIRECTORY
        + "; empty builds from the config instead",
    )
    text_encoder: str = option(
        "", "backbone hf: directory of the text encoder (from_pretrained)" + _DIRECTORY
    )
    vision_encoder: str = option(
        "", "backbone hf: directory of the vision encoder (from_pretrained)" + _DIRECTORY
    )
    tokenizer: str = option(
        "",
        "tokenizer directory" + _DIRECTORY + "; with data.source synthetic its vocabulary sizes "
        "the text-generation heads (empty: the text encoder's vocabulary); with hdf5 the "
        "federation file's vocab_size sizes them and this key is not used for that",
    )
    layers_per_block: int = option(1, "backbone layers per MoTE and per MoME block", min=1)
    paths: list = option(
        list(PATHS),
        "paths through the gated transformer that run",
        choices=PATHS,
        min=1,
    )
    encoder_lora_rank: int = option(8, "LoRA rank on the encoders (0: none)", min=0)
    encoder_lora_alpha: float = option(16.0, "LoRA alpha on the encoders", min=0.0)
    expert_lora_rank: int = option(4, "LoRA rank of MoTE/MoME experts", min=1)
    expert_lora_alpha: float = option(8.0, "LoRA alpha of MoTE/MoME experts", min=0.0)
    attention_lora_rank: int = option(16, "LoRA rank on block attention q and v", min=1)
    attention_lora_alpha: float = option(32.0, "LoRA alpha on block attention q and v", min=0.0)
    mode_lora_rank: int = option(4, "LoRA rank of MoDE domain experts", min=1)
    mode_lora_alpha: float = option(8.0, "LoRA alpha of MoDE domain experts", min=0.0)
    lora_dropout: float = option(0.3, "dropout on every LoRA input", min=0.0, max=1.0)
    answer_len: int = option(8, "answer positions a text-generation head predicts", min=1)


@dataclass
class FederationConfig:
    """The federation: clients, rounds, sampling and the FL algorithm."""

    algorithm: str = option(
        "tap", "registered FL algorithm (see `tapdist models`): tap, fedavg, local, disentafl"
    )
    baselines: list = option(
        [],
        "further registered algorithms (see `tapdist models`) run after the main one in the "
        "same job, from the same initial state and data, so results.json compares them side by "
        "side (e.g. [local, disentafl])",
    )
    clients: int = option(
        10,
        "number of clients in the federation; must equal the number of data.clients (data.source "
        "synthetic) or the federation file's client count (hdf5)",
        min=1,
    )
    clients_per_round: int = option(2, "clients sampled each round", min=1)
    rounds: int = option(10, "number of federated rounds", min=0)


@dataclass
class TrainConfig:
    """Local training of one model instance on one client: a fixed number of micro-batches per
    round for every client (a small dataset is cycled), AdamW, gradient clipping, a fresh
    optimizer every round, and a learning rate warmed up over the rounds."""

    local_steps: int = option(20, "optimizer steps per model per client-round", min=1)
    accumulation: int = option(1, "micro-batches accumulated per optimizer step", min=1)
    batch_size: int = option(32, "samples per micro-batch", min=1)
    lr: float = option(3e-4, "peak learning rate, reached after warmup_rounds", min=0.0)
    min_lr: float = option(
        1e-4,
        "learning rate of round 0 (with warmup_rounds 0 every round uses lr) and of post-FL "
        "fine-tuning and distillation (tap.finetune_steps)",
        min=0.0,
    )
    warmup_rounds: int = option(
        20,
        "rounds over which the learning rate rises linearly from min_lr to lr (0: lr from round 0)",
        min=0,
    )
    weight_decay: float = option(0.01, "AdamW weight decay", min=0.0)
    clip_norm: float = option(1.0, "gradient-norm clip per optimizer step (0: none)", min=0.0)
    amp: str = option(
        "auto",
        "mixed precision: auto = bf16 autocast on CUDA and none on CPU; bf16 forces it",
        choices=("auto", "bf16", "off"),
    )
    cuda_graphs: str = option(
        "auto",
        "auto = on CUDA, capture each micro-batch shape's forward and backward as a CUDA graph "
        "and replay it (one launch; the same results in fp32, within one bf16 rounding of a "
        "gradient under bf16); off = run every micro-batch eagerly",
        choices=("auto", "off"),
    )
    eval_batch_size: int = option(64, "samples per evaluation batch", min=1)


@dataclass
class TapConfig:
    """TAP: replacement margins (stage 1), local fine-tuning and distillation (stage 2)."""

    margin_image_cls: float = option(0.01, "replacement margin of image classification tasks")
    margin_text_cls: float = option(0.005, "replacement margin of text classification tasks")
    margin_image_gen: float = option(0.005, "replacement margin of image generation tasks")
    margin_text_gen: float = option(0.01, "replacement margin of text generation tasks")
    replacement_rule: str = option(
        "same_round",
        "same_round: score the trained global copy and the personal model on the same local "
        "batches of this round; stale: this round's global training loss against the personal "
        "model's training loss from the last round it trained",
        choices=("same_round", "stale"),
    )
    compare_batches: int = option(
        4, "micro-batches both models are scored on under the same_round rule", min=1
    )
    finetune_steps: int = option(
        50,
        "micro-batches of post-FL local fine-tuning at train.min_lr, for every method that "
        "fine-tunes: TAP's stage 2 (teacher fine-tuning, then student distillation), fedavg_ft, "
        "local, disentafl and the tap.ablations (double_finetune: twice as many); 0: none",
        min=0,
    )
    kd_temperature: float = option(1.0, "distillation temperature T", min=0.01)
    kd_image_cls: float = option(2e-3, "distillation weight of image classification tasks", min=0.0)
    kd_text_cls: float = option(1.0, "distillation weight of text classification tasks", min=0.0)
    kd_image_gen: float = option(2e-3, "distillation weight of image generation tasks", min=0.0)
    kd_text_gen: float = option(2e-3, "distillation weight of text generation tasks", min=0.0)
    ablations: list = option(
        [],
        "stage-2 variants evaluated beside TAP: no_distillation (the student fine-tuned on its "
        "task loss alone), double_finetune (the same with twice the micro-batches)",
        choices=ABLATIONS,
    )
    disentafl_weight: float = option(
        0.5, "DisentAFL: weight of the orthogonality loss between mod-task latents", min=0.0
    )


@dataclass
class DataConfig:
    """The federation's tasks and clients, and where their samples come from."""

    source: str = option(
        "synthetic",
        "synthetic: learnable samples generated from the seed for the tasks and clients below; "
        "hdf5: a federation file built by `tapdist data build` (data.path), whose tasks, clients, "
        "text_len and vocab_size are used: its vocab_size sizes the text-generation heads (not "
        "model.tokenizer), and federation.clients must equal its client count",
        choices=("synthetic", "hdf5"),
    )
    path: str = option(
        "",
        "hdf5: the federation file; a relative path is read from the config file's folder, also "
        "when given with --set (give an absolute path for a file elsewhere)",
    )
    tasks: list = option(
        [],
        "synthetic: mappings with name, kind, modalities, domains, classes (hdf5: from the file)",
        items=dict,
    )
    clients: list = option(
        [],
        "synthetic: mappings with tasks (names), samples (training samples per task) and test "
        "(held-out samples per task, default max(8, samples // 4)); hdf5: from the file",
        items=dict,
    )
    text_len: int = option(16, "tokens per text input (synthetic; hdf5: from the file)", min=2)


@dataclass
class DistConfig:
    """Processes, devices, transport and client placement."""

    launcher: str = option(
        "auto",
        "how the processes were started; auto reads the environment",
        choices=("auto", "single", "torchrun", "slurm", "mpi"),
    )
    backend: str = option(
        "auto",
        "collective transport; auto = nccl with CUDA, gloo otherwise",
        choices=("auto", "nccl", "gloo", "mpi"),
    )
    device: str = option(
        "auto", "compute device; auto = cuda if available", choices=("auto", "cpu", "cuda")
    )
    transport_dtype: str = option(
        "fp64",
        "dtype of the aggregated values on the wire; fp64 makes results independent of the "
        "world size, fp32 and bf16 send 1/2 and 1/4 of the bytes",
        choices=("fp64", "fp32", "bf16"),
    )
    timeout_s: float = option(600.0, "seconds a collective may wait for the other ranks", min=1.0)
    init_timeout_s: float = option(120.0, "seconds the rendezvous may take", min=1.0)
    server_hosts_clients: bool = option(True, "rank 0 (the server) also trains clients")
    placement: str = option(
        "round_robin", "how clients are assigned to ranks", choices=("round_robin", "balanced")
    )
    allow_idle_ranks: bool = option(False, "accept more client-hosting ranks than clients")


@dataclass
class BenchConfig:
    """Settings of `benchmarks/` runs."""

    warmup: int = option(2, "untimed repetitions before timing", min=0)
    repeats: int = option(10, "timed repetitions", min=1)


@dataclass
class Config:
    """The whole configuration; each field is one YAML section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tap: TapConfig = field(default_factory=TapConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    source: str = field(default="", compare=False, repr=False)  # file it was read from

    def __post_init__(self) -> None:
        fed = self.federation
        if fed.clients_per_round > fed.clients:
            raise ConfigError(
                f"federation.clients_per_round = {fed.clients_per_round} exceeds "
                f"federation.clients = {fed.clients}; accepted: 1..{fed.clients}"
            )
        if self.dist.transport_dtype == "bf16" and self.dist.backend == "mpi":
            raise ConfigError(
                "dist.transport_dtype = bf16 is not available with dist.backend = mpi "
                "(MPI has no bfloat16 sum); accepted: fp64 or fp32 with mpi, or bf16 with gloo/nccl"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir or os.path.join("runs", self.run.name))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in sections()}


def sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.name != "source"]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(raw)
    cfg.source = str(Path(path).resolve()) if path is not None else ""
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from nested mappings."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    known = {f.name: f for f in sections()}
    values = {}
    for name, body in raw.items():
        if name not in known:
            raise ConfigError(
                f"unknown section '{name}'{_suggest(name, known)}; "
                f"accepted sections: {', '.join(known)}"
            )
        values[name] = _build_section(name, _kind(known[name]), {} if body is None else body)
    return Config(**values)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text (every key, defaults included)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe() -> str:
    """Every section and key with its default and help text, as commented YAML."""
    lines = [
        "# Every tapdist config key: default, accepted values, meaning.",
        "# Generated by `tapdist config --describe`; a config file sets only what differs.",
        "",
    ]
    for sec in sections():
        cls = _kind(sec)
        doc = " ".join(cls.__doc__.split())  # one comment line
        lines.append(f"{sec.name}:  # {doc}")
        fields = dataclasses.fields(cls)
        if not fields:
            lines[-1] = f"{sec.name}: {{}}  # {doc}"
        for f in fields:
            default = yaml.safe_dump(_default(f), default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {f.name}: {default}  # {_accepted(f)}; {f.metadata['help']}")
        lines.append("")
    return "\n".join(lines)


# --- internals ------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"override '{item}' must look like section.key=value (for example federation.rounds=5)"
        )
    section, name = parts
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if raw.get(section) is None:  # absent, or in the file with every key commented out
        raw[section] = {}
    body = raw[section]
    if not isinstance(body, dict):
        raise ConfigError(f"section '{section}' must be a mapping, got {type(body).__name__}")
    body[name] = _Override(value, text)


@dataclass
class _Override:
    """A value from the command line; remembers its text so a str key can take '41' as is."""

    value: Any
    text: str


def _build_section(section: str, cls: type, body: Any) -> Any:
    if not isinstance(body, dict):
        raise ConfigError(
            f"section '{section}' must be a mapping of keys, got {type(body).__name__}"
        )
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in body.items():
        if key not in known:
            accepted = ", ".join(known) if known else "none yet"
            raise ConfigError(
                f"unknown key '{section}.{key}'{_suggest(key, known)}; "
                f"accepted keys in section '{section}': {accepted}"
            )
        kwargs[key] = _check(section, known[key], value)
    return cls(**kwargs)


def _check(section: str, f: dataclasses.Field, value: Any) -> Any:
    origin = ""
    if isinstance(value, _Override):
        origin = f" (from --set {section}.{f.name}={value.text})"
        value = value.text if _kind(f) is str and not isinstance(value.value, str) else value.value
    kind = _kind(f)
    if kind is float and isinstance(value, str):
        value = _yaml_float(value)
    if kind is str and isinstance(value, bool) and f.metadata["choices"]:
        value = _yaml_word(value, f.metadata["choices"])
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: _finite_number,
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list) and all(isinstance(x, f.metadata["items"]) for x in v),
    }[kind](value)
    if not (ok and _in_range(f, value)):
        unknown = ""
        if ok and kind is list and f.metadata["choices"]:
            bad = [x for x in value if x not in f.metadata["choices"]]
            unknown = f"unknown: {', '.join(map(str, bad))}; " if bad else ""
        raise ConfigError(
            f"bad value for '{section}.{f.name}': {value!r}{origin}; {unknown}"
            f"accepted: {_accepted(f)}"
        )
    return float(value) if kind is float else value


def _in_range(f: dataclasses.Field, value: Any) -> bool:
    """Whether a value of the right type is among the choices and within min and max (for a
    list: every item among the choices, and at least min items)."""
    meta = f.metadata
    choices, low, high = meta["choices"], meta["min"], meta["max"]
    if _kind(f) is list:
        return (choices is None or all(x in choices for x in value)) and (
            low is None or len(value) >= low
        )
    return (
        (choices is None or value in choices)
        and (low is None or value >= low)
        and (high is None or value <= high)
    )


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _yaml_word(value: bool, choices: typing.Iterable[str]) -> bool | str:
    """YAML 1.1 reads off/no/false (on/yes/true) unquoted as a boolean; a key whose choices
    hold such a word takes it back."""
    words = ("on", "yes", "true") if value else ("off", "no", "false")
    return next((w for w in words if w in choices), value)


def _yaml_float(text: str) -> float | str:
    """YAML 1.1 reads 3e-4 (no dot) as a string; a float key takes it as the number it is."""
    try:
        return float(text)
    except ValueError:
        return text


def _accepted(f: dataclasses.Field) -> str:
    meta, kind = f.metadata, _kind(f)
    if kind is list:
        noun = "a list of strings" if meta["items"] is str else "a list of mappings"
        if meta["min"]:
            noun += f" (at least {meta['min']})"
        if meta["choices"]:
            noun += ", each one of " + ", ".join(map(str, meta["choices"]))
        return noun
    if meta["choices"]:
        return "one of " + ", ".join(map(str, meta["choices"]))
    noun = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }[kind]
    if meta["min"] is not None and meta["max"] is not None:
        return f"{noun} in [{meta['min']}, {meta['max']}]"
    if meta["min"] is not None:
        return f"{noun} >= {meta['min']}"
    return noun


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_PLAIN = {"str": str, "int": int, "float": float, "bool": bool, "list": list}


def _kind(f: dataclasses.Field) -> type:
    """The class a field holds (annotations are strings under postponed evaluation)."""
    hint = f.type
    if isinstance(hint, str):
        hint = _PLAIN.get(hint) or globals()[hint]
    return hint
