"""Checkpoints of a run, and resuming from the newest complete one at any world size.

A checkpoint is a folder ``RUN_DIR/checkpoints/<i>-<algorithm>-round<NNNNNN>/`` holding

- ``global.h5``: the global state after that round (written by the server);
- ``clients-rank<NNNN>.h5``: what the algorithm keeps for each client the rank hosts (TAP's
  personal models and their last losses; Local's models), one group per client, written by
  every rank (empty where it keeps nothing yet), so a file left by an earlier attempt at the
  same folder is always replaced or, from a rank the job no longer has, never read;
- ``MANIFEST.json``, written last by the server once every rank has written its file: the
  algorithm, the round, the algorithm's shared state, the results of algorithms the job already
  finished, and the resolved config. When the algorithm has finished (its post-FL stage and
  evaluation too) the server rewrites the manifest of its last checkpoint with its results and
  ``finished: true``, so a later job goes on with the next algorithm and never redoes that one.

Every file is written atomically (temp, fsync, rename) and a folder without its manifest is
never read, so a crash mid-write leaves the previous checkpoint in charge. A checkpoint whose
manifest or files cannot be read is damaged: resuming stops with a message that names it and
the checkpoint before it, before anything in the run folder changes. Folders whose names do not
have the form above (a backup copy, say) are neither read nor pruned. Sampling and client
seeds are functions of (seed, round, client), so the round counter is the whole random state.
A rank of a resumed run reads every ``clients-*.h5`` and keeps the clients it now hosts: the
world size may change between jobs (the files must be on a filesystem every rank sees).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tapdist.checkpoint import load_state, load_states, save_state, save_states, write_text
from tapdist.config import MODEL_DIRECTORIES, Config, ConfigError
from tapdist.dist import DistContext
from tapdist.fl.algorithms import Algorithm
from tapdist.fl.topology import Topology
from tapdist.models.base import State
from tapdist.run_dir import absolute_path, portable

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT = "tapdist-checkpoint"
# sections whose values decide the numbers; a resumed run must not change them
_FIXED = ("model", "federation", "train", "tap", "data")
# and the keys of other sections that do (the seed; the averages' wire precision)
_FIXED_KEYS = ("run.seed", "dist.transport_dtype")
_FOLDER = re.compile(r"(\d+)-(.+)-round(\d{6})")
# what a manifest holds, with the type of each value
_MANIFEST_KEYS = {
    "format": str,
    "algorithm": str,
    "algorithm_index": int,
    "round": int,
    "world_size": int,
    "algorithm_state": dict,
    "results": dict,
    "config": dict,
}


def job_identity() -> str:
    """The launcher's name for this job, the same across its restarts: a Slurm job id, or
    torchrun's run id ("" when neither is set)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{os.environ['TORCHELASTIC_RUN_ID']}"
    return ""


class CheckpointDamaged(ConfigError):
    """A complete checkpoint whose manifest or files cannot be read."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    folder: Path
    manifest: dict

    @property
    def algorithm_index(self) -> int:
        return self.manifest["algorithm_index"]

    @property
    def round(self) -> int:
        """Rounds completed."""
        return self.manifest["round"]

    @property
    def finished(self) -> bool:
        """Whether its algorithm finished (post-FL stage and evaluation included)."""
        return bool(self.manifest.get("finished"))

    def global_state(self) -> State:
        return self._read(self.folder / "global.h5", load_state)

    def client_states(self, clients: set[int]) -> dict[int, State]:
        """What the algorithm kept for ``clients``, from the files of the ranks of the job that
        wrote the checkpoint (every one of them wrote its file before the manifest)."""
        out = {}
        for rank in range(self.manifest["world_size"]):
            path = self.folder / f"clients-rank{rank:04d}.h5"
            for client, state in self._read(path, _client_states).items():
                if client in clients:
                    out[client] = state
        return out

    def _read(self, path: Path, load):
        try:
            return load(path)
        except (OSError, KeyError, ValueError) as err:
            raise CheckpointDamaged(
                f"checkpoint {self.folder} is damaged: {path.name}: {err}; it must be on a "
                "filesystem every rank sees, complete, as the job wrote it. "
                + _fallback(self.folder)
            ) from None


class Checkpointer:
    """Writes a run's checkpoints and finds the one to resume from."""

    def __init__(self, cfg: Config, ctx: DistContext, topology: Topology, run_dir: Path):
        self.cfg, self.ctx, self.topology = cfg, ctx, topology
        self.root = run_dir / "checkpoints"
        self.server = topology.is_server(ctx.rank)

    def due(self, round_index: int) -> bool:
        """Whether the round just completed (0-based ``round_index``) gets a checkpoint."""
        done = round_index + 1
        return done % self.cfg.run.checkpoint_every == 0 or done == self.cfg.federation.rounds

    def save(
        self,
        index: int,
        name: str,
        algorithm: Algorithm,
        rounds_done: int,
        state: State,
        results: dict,
    ) -> None:
        """Write the checkpoint after ``rounds_done`` rounds of algorithm number ``index``
        (registered as ``name``)."""
        folder = self.root / f"{index}-{name}-round{rounds_done:06d}"
        hosted = self.topology.clients_of(self.ctx.rank)
        own = {f"client_{c}": algorithm.client_state(c) for c in hosted}
        if self.server:
            save_state(folder / "global.h5", state)
        save_states(folder / f"clients-rank{self.ctx.rank:04d}.h5", own)
        self.ctx.barrier(f"checkpoint after round {rounds_done}")
        if self.server:
            manifest = {
                "format": FORMAT,
                "algorithm": name,
                "algorithm_index": index,
                "round": rounds_done,
                "world_size": self.ctx.world_size,
                "algorithm_state": algorithm.state_dict(),
                "results": results,
                "config": portable(self.cfg).to_dict(),  # as RUN_DIR/config.yaml holds it
                "job": job_identity(),
            }
            write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
            self._prune(folder)
            log.info("checkpoint: %s", folder)

    def finished(self, index: int, name: str, rounds_done: int, results: dict) -> None:
        """Mark the checkpoint after the last round of algorithm ``index`` as finished, with
        the results so far (the server rewrites its manifest; the other ranks do nothing)."""
        if not self.server:
            return
        path = self.root / f"{index}-{name}-round{rounds_done:06d}" / MANIFEST
        if not path.exists():  # no round, no checkpoint (federation.rounds = 0)
            return
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest.update(finished=True, results=results)
        write_text(path, json.dumps(manifest, indent=1))

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, checked against this run's config."""
        newest = self.newest()
        if newest is not None:
            self._check_config(newest.folder, newest.manifest["config"])
        return newest

    def newest(self) -> Checkpoint | None:
        """The newest complete checkpoint in the run folder, whatever run wrote it."""
        return newest_checkpoint(self.root)

    def _check_config(self, folder: Path, saved: dict) -> None:
        now = portable(self.cfg).to_dict()
        base = Path(self.cfg.source).parent if self.cfg.source else Path.cwd()
        for key in MODEL_DIRECTORIES:  # as paths, whichever way they were written
            if isinstance(saved["model"].get(key), str):
                saved["model"][key] = absolute_path(saved["model"][key], base)
        changed = [
            f"{section}.{key}"
            for section in _FIXED
            for key in saved[section]
            if saved[section][key] != now[section].get(key) and f"{section}.{key}" != "data.path"
        ]
        for name in _FIXED_KEYS:
            section, key = name.split(".")
            if saved[section].get(key) != now[section][key]:
                changed.append(name)
        if changed:
            raise ConfigError(
                f"cannot resume from {folder}: the config changed ({', '.join(changed)}); "
                "resume with the config the run started with (RUN_DIR/config.yaml)"
            )

    def _prune(self, newest: Path) -> None:
        """Keep the newest ``run.keep_checkpoints`` complete checkpoints, drop the rest."""
        folders = checkpoint_folders(self.root)
        complete = [f for f in folders if (f / MANIFEST).exists()]
        keep = set(complete[: self.cfg.run.keep_checkpoints]) | {newest}
        for folder in folders:
            if folder not in keep and _order(folder) < _order(newest):
                shutil.rmtree(folder, ignore_errors=True)


def newest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints`` folder), whatever
    run wrote it; a folder without a manifest is incomplete and skipped, one whose manifest
    cannot be read is damaged (:class:`CheckpointDamaged`)."""
    for folder in checkpoint_folders(root):
        path = folder / MANIFEST
        if not path.exists():
            continue  # not complete: a crash before its manifest
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointDamaged(
                f"checkpoint {folder} is damaged: {MANIFEST}: {err}. {_fallback(folder)}"
            ) from None
        wrong = _manifest_problem(manifest)
        if wrong:
            raise CheckpointDamaged(
                f"checkpoint {folder} is damaged: {MANIFEST} {wrong}. {_fallback(folder)}"
            )
        return Checkpoint(folder, manifest)
    return None


def _client_states(path: Path) -> dict[int, State]:
    out = {}
    for group, state in load_states(path).items():
        if not group.startswith("client_") or not group[7:].isdigit():
            raise ValueError(f"group '{group}' is not a client's")
        out[int(group[7:])] = state
    return out


def _manifest_problem(manifest: object) -> str:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"is not a {FORMAT} manifest"
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            return f"has no {kind.__name__} '{key}'"
    sections = {*_FIXED, *(k.split(".")[0] for k in _FIXED_KEYS)}
    if any(not isinstance(manifest["config"].get(s), dict) for s in sections):
        return "has no complete 'config'"
    return ""


def _fallback(folder: Path) -> str:
    """What to do about a damaged checkpoint: delete it, to resume from the one before."""
    older = [f for f in checkpoint_folders(folder.parent) if _order(f) < _order(folder)]
    complete = [f for f in older if (f / MANIFEST).exists()]
    if complete:
        return f"Delete {folder} to resume from {complete[0].name}, the checkpoint before it"
    return f"No complete checkpoint precedes it; delete {folder.parent} to start the run over"


def checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoint folders under ``root``, newest first; other names are not ours."""
    found = [f for f in root.glob("*-round*") if f.is_dir() and _FOLDER.fullmatch(f.name)]
    return sorted(found, key=_order, reverse=True)


def _order(folder: Path) -> tuple[int, int]:
    index, _, rounds = _FOLDER.fullmatch(folder.name).groups()
    return int(index), int(rounds)
