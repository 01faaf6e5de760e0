"""Rank-aware logging, progress of long phases, and per-round TensorBoard scalars.

Every rank logs to stderr with its rank in every line: the server at ``run.log_level``, the
other ranks only warnings and errors unless ``run.log_all_ranks``. With ``run.log_files`` every
rank also writes all its records at ``run.log_level`` to ``RUN_DIR/logs/rank-NNNN.log``,
appended to across resumes. :class:`Progress` reports the steps of a long phase (a bar redrawn
in place on a terminal, a log line per step otherwise); :class:`TensorBoardScalars` writes each
round's metrics record as TensorBoard scalars (``run.tensorboard``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tapdist.config import ConfigError

LOGGER = "tapdist"
# Records of Progress steps carry this attribute: a terminal shows them as the bar instead.
_PROGRESS = "tapdist_progress"
_CLEAR_LINE = "\r\x1b[K"


def setup_logging(
    rank: int,
    world_size: int,
    level: str = "info",
    all_ranks: bool = False,
    is_server: bool = True,
    log_file: Path | None = None,
) -> None:
    """Log to stderr with the rank in every line (non-server ranks: warnings and errors unless
    ``all_ranks``) and, given ``log_file``, every record at ``level`` to that file too."""
    chosen = getattr(logging, level.upper())
    width = len(str(world_size - 1))
    line = f"[tapdist r{rank:0{width}d} %(asctime)s] %(levelname)s %(message)s"
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(chosen if is_server or all_ranks else max(chosen, logging.WARNING))
    if sys.stderr.isatty():
        # Progress shows as a bar redrawn in place; a record overwrites the bar's line (return,
        # clear the line) and the bar comes back below it at its next update.
        console.setFormatter(logging.Formatter(_CLEAR_LINE + line, "%H:%M:%S"))
        console.addFilter(_not_progress)
    else:
        console.setFormatter(logging.Formatter(line, "%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        handlers.append(_file_handler(Path(log_file), line))
    root = logging.getLogger(LOGGER)
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(chosen)
    root.propagate = False
    if log_file is not None:
        root.info("rank %d of %d (pid %d) logs to %s", rank, world_size, os.getpid(), log_file)


def rank_log_file(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its log records when ``run.log_files`` is on."""
    return Path(run_dir) / "logs" / f"rank-{rank:04d}.log"


def _file_handler(path: Path, line: str) -> logging.FileHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(line, "%Y-%m-%d %H:%M:%S"))
    return handler


def format_bytes(nbytes: float) -> str:
    """``nbytes`` in B, kB, MB or GB (powers of 1000)."""
    for unit in ("B", "kB", "MB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


def _not_progress(record: logging.LogRecord) -> bool:
    return not getattr(record, _PROGRESS, False)


class Progress:
    """Progress of a long phase. Every step (and every :meth:`note` within a step) is a log
    record, so a rank's log file keeps it and a batch job's log shows it; on a terminal the rank
    that draws the ``bar`` (the server; the other ranks share its terminal) redraws a bar in
    place instead of printing those lines."""

    def __init__(
        self,
        label: str,
        total: int,
        bar: bool = True,
        width: int = 24,
        quiet_s: float = 30.0,
        done: int = 0,
    ):
        """``total`` steps, ``done`` of them already (a resumed job's rounds)."""
        self.label, self.total, self.width, self.quiet_s = label, total, width, quiet_s
        self.done = done
        self.started = self.last_line = time.perf_counter()
        self.tty = bar and sys.stderr.isatty()
        self.last_drawn = (0.0, "")
        self.log = logging.getLogger(LOGGER)

    def __enter__(self) -> Progress:
        return self

    def step(self, message: str = "") -> None:
        """One step done."""
        self.done += 1
        self._report(logging.INFO, message)

    def note(self, message: str) -> None:
        """Work within the current step: shown on the bar; logged at info level when
        ``quiet_s`` seconds passed since the last line (a slow step is never silent), at debug
        level otherwise."""
        quiet = time.perf_counter() - self.last_line >= self.quiet_s
        self._report(logging.INFO if quiet else logging.DEBUG, message)

    def _report(self, level: int, message: str) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        if self.log.isEnabledFor(level):
            self.last_line = now
            self.log.log(
                level,
                "%s %d/%d (%.1fs): %s",
                self.label,
                self.done,
                self.total,
                elapsed,
                message,
                extra={_PROGRESS: True},
            )
        if self.tty:
            self._draw(elapsed, message)

    def _draw(self, elapsed: float, message: str) -> None:
        self.last_drawn = (elapsed, message)
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:.0f}s {message}"
        columns = shutil.get_terminal_size((120, 20)).columns
        sys.stderr.write("\r" + line[: columns - 1].ljust(columns - 1))
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.tty and self.done:
            self._draw(*self.last_drawn)  # again: a log record may have overwritten it
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- TensorBoard --------------------------------------------------------------------------------


def require_tensorboard() -> type:
    """TensorBoard's SummaryWriter; a ConfigError saying what to install when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "run.tensorboard is true but the tensorboard package is not installed: "
            "pip install 'tapdist[tensorboard]', or set run.tensorboard: false"
        ) from None
    return SummaryWriter


class TensorBoardScalars:
    """Round records of one algorithm as TensorBoard scalars in ``folder``; the step is the round
    counted from 1, as the logs and `tapdist report` count it (metrics.jsonl's round + 1)."""

    def __init__(self, folder: Path, first_round: int = 0):
        writer = require_tensorboard()
        # Rounds from first_round on run now (again, after a resume; or a fresh run in an old
        # folder): TensorBoard hides the events an earlier job wrote for them.
        self.writer = writer(str(folder), purge_step=first_round + 1)

    def __enter__(self) -> TensorBoardScalars:
        return self

    def add(self, record: Mapping) -> None:
        step = int(record["round"]) + 1
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def __exit__(self, *exc) -> None:
        self.writer.close()


def round_scalars(record: Mapping) -> dict[str, float]:
    """The numbers of a metrics.jsonl round record under TensorBoard tags.

    Per client: ``<metric>/client_<c>/<task>`` for per-task metrics (``global_loss``,
    ``personal_loss``, ``replaced``, ...) and ``client_seconds/client_<c>/<phase>``; per metric
    ending in ``_loss``, ``<metric>/mean`` over the round's (client, task) values; per round,
    ``<field>/<key>`` for each mapping of numbers (``replacements``,
    ``replacements_cumulative``, ``seconds``) and ``round/<field>`` for each plain number
    (``tensors_updated``, ``bytes_sent_per_rank``).
    """
    out: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    for client, stats in record.get("clients", {}).items():
        for key, value in stats.items():
            metric, _, task = key.partition(".")
            if task:
                out[f"{metric}/client_{client}/{task}"] = float(value)
                if metric.endswith("_loss"):
                    losses.setdefault(metric, []).append(float(value))
            elif key.endswith("_s"):
                out[f"client_seconds/client_{client}/{key}"] = float(value)
    for metric, values in losses.items():
        out[f"{metric}/mean"] = math.fsum(values) / len(values)
    for key, value in record.items():
        if key in ("algorithm", "round", "sampled", "clients"):
            continue
        if isinstance(value, Mapping):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[f"round/{key}"] = float(value)
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
