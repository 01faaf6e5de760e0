"""A run's folder: whether the run can write it, which run holds it, and a fresh start in it.

One run writes a folder at a time. The server holds ``RUN_DIR/.lock`` (host, process, Slurm job
and restart, start time) from the end of every rank's input checks to the end of the job;
another run that finds it stops before writing anything. A lock left by a run that can no longer
hold it is taken over: one of a process of this host that is gone, or one of this same Slurm job
from an earlier start (requeued).

A fresh start writes over nothing it was not asked to: a folder holding an earlier run's outputs
(metrics, results, report, final models, TensorBoard events, checkpoints) is refused unless the
run was started with ``--overwrite``, and then only those files of tapdist's go; anything else in
the folder stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from tapdist.checkpoint import write_text
from tapdist.config import MODEL_DIRECTORIES, Config, ConfigError, dump_config, from_dict
from tapdist.resources import PREFIX

log = logging.getLogger(__name__)

LOCK = ".lock"


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

    @staticmethod
    def check(run_dir: Path) -> None:
        """Stop now if another live run holds ``run_dir`` (read only; the claim comes later)."""
        path = run_dir / LOCK
        if path.exists():
            holder = _read(path)
            if not _stale(holder, _me()):
                raise ConfigError(_busy(run_dir, holder))

    @classmethod
    def claim(cls, run_dir: Path) -> RunLock:
        run_dir.mkdir(parents=True, exist_ok=True)
        path, owner = run_dir / LOCK, _me()
        for _ in range(3):  # again after taking over a stale lock
            # written whole beside it, then linked in: a lock is never seen half-written, and
            # the link fails if another run's lock is there
            fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=run_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(owner, out)
            try:
                os.link(tmp, path)
                return cls(path, owner)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            holder = _read(path)
            why = _stale(holder, owner)
            if not why:
                raise ConfigError(_busy(run_dir, holder))
            aside = path.with_name(f"{LOCK}.stale-{os.getpid()}")
            try:
                os.rename(path, aside)  # one claimant wins the stale lock; the others retry
            except FileNotFoundError:
                continue
            if _read(aside) != holder:  # a fresh lock of another claimant: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
                os.unlink(aside)
                continue
            os.unlink(aside)
            log.warning("%s: taking over the lock of %s (%s)", run_dir, _who(holder), why)
        raise ConfigError(f"{path}: other runs are claiming this folder at the same moment")

    def release(self) -> None:
        """Give the folder up (only a lock this run still holds is removed)."""
        if _read(self.path) == self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def earlier_outputs(run_dir: Path) -> list[Path]:
    """What an earlier run wrote in ``run_dir`` and a fresh start would replace: a metrics file
    with records, results, the report and its plots, final models, TensorBoard event files and
    checkpoint folders (other files are not tapdist's and are never listed)."""
    from tapdist.fl.checkpoints import checkpoint_folders
    from tapdist.report import PLOT_FILES, PLOTS

    files = [run_dir / n for n in ("results.json", "results.md", "report.md", "final/global.h5")]
    files += sorted((run_dir / "final").glob("personal-rank*.h5"))
    files += [p for pattern in PLOT_FILES for p in sorted((run_dir / PLOTS).glob(pattern))]
    files += sorted((run_dir / "tensorboard").glob("*/events.out.tfevents.*"))
    found = [p for p in files if p.is_file()]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:  # an empty one is a fresh start's
        found.append(metrics)
    return found + checkpoint_folders(run_dir / "checkpoints")


def start_fresh(cfg: Config, run_dir: Path) -> None:
    """A new run in ``run_dir``: drop what an earlier run left there (:func:`earlier_outputs`;
    :func:`tapdist.train.train` refuses a folder that holds any unless asked to overwrite it),
    then write the resolved config and an empty metrics file."""
    for old in earlier_outputs(run_dir):
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    emptied = [*(run_dir / "tensorboard").glob("*"), run_dir / "tensorboard"]
    for folder in (run_dir / "final", run_dir / "report", *emptied):
        with contextlib.suppress(OSError):  # gone, or holding files that are not tapdist's
            folder.rmdir()
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

    out.data.path = absolute_path(out.data.path, base)
    for key in MODEL_DIRECTORIES:
        setattr(out.model, key, absolute_path(getattr(out.model, key), base))
    out.run.plugins = [absolute_path(p, base) if p.endswith(".py") else p for p in out.run.plugins]
    return out


def absolute_path(path: str, base: Path) -> str:
    """``path`` as :func:`tapdist.resources.resolve` reads it from ``base``, normalised; empty
    and ``package:`` paths as they are."""
    if not path or path.startswith(PREFIX):
        return path
    p = Path(path).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


def _me() -> dict:
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": os.environ.get("SLURM_JOB_ID", ""),
        "restart": int(restarts) if restarts.isdigit() else 0,
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
    if holder.get("host") == me["host"]:  # this host: whether its process lives decides
        if holder.get("pid") == me["pid"]:
            return "an earlier start that had this process id"
        return "" if _alive(holder.get("pid")) else "its process is gone"
    restart = holder.get("restart")
    if holder.get("job") and holder["job"] == me["job"]:
        if isinstance(restart, int) and restart < me["restart"]:
            return f"Slurm job {me['job']} before its restart {me['restart']}"
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
