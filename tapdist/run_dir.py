"""A run's folder: whether the run can write it, which run holds it, and a fresh start in it.

One run writes a folder at a time. The server holds ``RUN_DIR/.lock`` (host, process, Slurm job,
start time) from the end of its input checks to the end of the job; another run that finds it
stops before writing anything. A lock left by a run that can no longer hold it is taken over: one
of a process of this host that is gone, or one of this same Slurm job (requeued or restarted).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from tapdist.checkpoint import write_text
from tapdist.config import Config, ConfigError, dump_config, from_dict
from tapdist.resources import PREFIX

log = logging.getLogger(__name__)

LOCK = ".lock"
# what an earlier run left that a fresh start replaces (checkpoints: see `start_fresh`)
OUTPUTS = ("results.json", "results.md", "report.md", "report", "final", "tensorboard")


def check_writable(run_dir: Path) -> None:
    """Stop now, before any work, when the run could not write ``run_dir``: a path through a
    file, or a folder this process may not write (its permissions, a read-only filesystem, an
    immutable folder: what access(2) answers, so the folder is not touched)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"run folder {run_dir}: {existing} is a file, not a folder; choose another --run-dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run folder {run_dir}: this process may not write in {existing}; make it writable "
            "or choose another --run-dir"
        )


class RunLock:
    """The claim of one run on its folder (see the module docstring)."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner

    @classmethod
    def claim(cls, run_dir: Path) -> RunLock:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        owner = _me()
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                why = _stale(holder, owner)
                if not why:
                    raise ConfigError(_busy(run_dir, holder)) from None
                log.warning("%s: taking over the lock of %s (%s)", run_dir, _who(holder), why)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(owner, out)
            return cls(path, owner)
        raise ConfigError(f"{path}: another run claimed this folder at the same moment")

    def release(self) -> None:
        """Give the folder up (only a lock this run still holds is removed)."""
        if _read(self.path) == self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def start_fresh(cfg: Config, run_dir: Path) -> None:
    """A new run in ``run_dir``: drop what an earlier run left there (its results, report, final
    models, TensorBoard scalars and checkpoints; :func:`tapdist.train.train` refuses a folder
    with an earlier run's complete checkpoints unless asked to overwrite them), then write the
    resolved config and an empty metrics file."""
    for name in (*OUTPUTS, "checkpoints"):
        old = run_dir / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    write_text(run_dir / "config.yaml", dump_config(portable(cfg)))
    write_text(run_dir / "metrics.jsonl", "")


def portable(cfg: Config) -> Config:
    """``cfg`` with the paths it reads relative to its file (``data.path``, the model's
    directories, ``.py`` plugins) made absolute, so ``RUN_DIR/config.yaml`` works where it is."""
    if not cfg.source:
        return cfg
    base = Path(cfg.source).parent
    out = from_dict(cfg.to_dict())
    out.source = cfg.source

    def absolute(path: str) -> str:
        if not path or path.startswith(PREFIX) or Path(path).expanduser().is_absolute():
            return path
        return str(base / path)

    out.data.path = absolute(out.data.path)
    for key in ("pretrained", "text_encoder", "vision_encoder", "tokenizer"):
        setattr(out.model, key, absolute(getattr(out.model, key)))
    out.run.plugins = [p if not p.endswith(".py") else absolute(p) for p in out.run.plugins]
    return out


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": os.environ.get("SLURM_JOB_ID", ""),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict, me: dict) -> str:
    """Why ``holder`` can no longer hold the folder ("" when it may)."""
    if not holder:
        return "unreadable"
    if holder.get("job") and holder.get("job") == me["job"]:
        return f"the same Slurm job {me['job']}, started again"
    if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
        return "its process is gone"
    return ""


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _who(holder: dict) -> str:
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}"


def _busy(run_dir: Path, holder: dict) -> str:
    return (
        f"{run_dir} is in use by another run ({_who(holder)}, since {holder.get('since')}); "
        f"wait for it, choose another --run-dir, or, if that run has ended, delete "
        f"{run_dir / LOCK}"
    )
