"""`tapdist model-info`: parameter counts, bytes per round and memory of a config's model."""

from __future__ import annotations

import os
import resource
import time

from tapdist.config import Config
from tapdist.models.federated import TapFederation
from tapdist.models.tap import TapModel


def model_info(cfg: Config) -> str:
    """A human-readable report on the server (union) model and each client's sub-model. The
    tasks and clients come from where a run takes them: the config (``data.source:
    synthetic``) or the federation file's metadata (``hdf5``; the file must exist)."""
    started = time.perf_counter()
    federation = TapFederation(cfg, "cpu")  # builds the model as `tapdist train` does
    built = time.perf_counter() - started
    model, clients = federation.model, federation.specs
    params = dict(model.named_parameters())
    trainable = model.trainable_names()
    frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
    n_train = sum(params[n].numel() for n in trainable)
    m = cfg.model
    lines = [
        f"model: tap on {m.backbone} ({m.pretrained or m.size}), "
        f"{m.layers_per_block} layer(s) per block, paths {', '.join(m.paths)}",
        f"built in {built:.1f}s; resident memory of this process: {_rss_mb():.0f} MB "
        f"(parameters {_mb(sum(p.numel() * p.element_size() for p in params.values()))})",
        "",
        "| model | tensors | total params | frozen | trainable | upload fp32 | upload bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        _row("server (union)", len(trainable), frozen + n_train, frozen, n_train),
    ]
    for client in clients:
        names = model.client_names(client.tasks)
        n = sum(params[x].numel() for x in names)
        used_frozen = frozen_used(model, client.tasks)
        lines.append(
            _row(
                f"client {client.id} ({'+'.join(client.tasks)})",
                len(names),
                used_frozen + n,
                used_frozen,
                n,
            )
        )
    union_bytes = n_train + len(trainable)
    lines += [
        "",
        f"all_reduce buffer per rank per round, at most (a round sends only the tensors its "
        f"clients hold): {_mb(8 * union_bytes)} (fp64), "
        f"{_mb(4 * union_bytes)} (fp32), {_mb(2 * n_train + 4 * len(trainable))} (bf16)",
    ]
    return "\n".join(lines)


def frozen_used(model: TapModel, tasks) -> int:
    """Frozen parameters a client's forward reads: its modalities' towers and the gated layers'
    bases (which may live inside a tower), each counted once."""
    modalities = {m for t in tasks for m in model.tasks[t].modalities}
    seen = {}
    modules = [model.encoders[m] for m in modalities]
    modules += [mod for b in model.bases for mod in b.modules()]
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())


def _row(label: str, tensors: int, total: int, frozen: int, trainable: int) -> str:
    return (
        f"| {label} | {tensors} | {_count(total)} | {_count(frozen)} | {_count(trainable)} "
        f"| {_mb(4 * trainable)} | {_mb(2 * trainable)} |"
    )


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _rss_mb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
