"""`tapdist report RUN_DIR`: plots and a summary of a run folder.

Reads ``RUN_DIR/metrics.jsonl`` (one record per round and algorithm) and, once the run has
finished, ``RUN_DIR/results.json``; writes ``RUN_DIR/report.md`` and its PNG plots in
``RUN_DIR/report/``:

- ``loss-<algorithm>.png``: training loss per client and task over the rounds (for TAP, the
  global copy and the personal model);
- ``replacements.png``: replacements per task kind, each round and cumulative (TAP);
- ``comparison.png``: each method's mean primary metric per task kind, from results.json;
- ``time.png``: seconds per round by phase, stacked.

A run stopped while writing leaves a cut-short last line in metrics.jsonl; it is left out with a
warning. A run with ``federation.rounds: 0`` records no rounds: its report holds the comparison
alone. Every file is written atomically. The plots are drawn with matplotlib's Agg canvas
(no display, no pyplot state), imported only here: ``pip install 'tapdist[plot]'``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tapdist.checkpoint import atomic_path, write_text
from tapdist.evaluate import METRICS, PRIMARY
from tapdist.logs import format_bytes
from tapdist.results import DIRECTION, FRACTIONS, format_table, format_value, kind_averages

log = logging.getLogger(__name__)

Records = dict[str, list[dict]]  # algorithm -> its round records, in round order

PLOTS = "report"  # folder of the PNGs, beside report.md
#: the PNGs a report writes there (``loss-<algorithm>.png`` one per algorithm)
PLOT_FILES = ("loss-*.png", "replacements.png", "comparison.png", "time.png")
DPI = 110
# how plots name the models and phases that metrics.jsonl names by key
MODEL_LABELS = {
    "global_loss": "global copy",
    "personal_loss": "personal model",
    "local_loss": "local model",
}
PHASE_LABELS = {
    "global_s": "global copy training",
    "replace_s": "replacement scoring",
    "personal_s": "personal model training",
    "local_s": "local training",
}
_LINE_STYLES = ("-", "--", ":", "-.")
_REQUIRED = {"algorithm": str, "round": int, "clients": dict, "seconds": dict}


class ReportError(ValueError):
    """The run folder cannot be reported on, or matplotlib is missing."""


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir``/report.md and its plots; return the path of report.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        why = "is not a folder" if run_dir.exists() else "does not exist"
        raise ReportError(f"run folder {run_dir} {why}")
    _require_matplotlib()
    metrics = run_dir / "metrics.jsonl"
    runs = read_metrics(metrics)
    if not runs and not (run_dir / "results.json").is_file():
        raise ReportError(f"{metrics} holds no rounds yet: the run stopped before its first round")
    results = read_results(run_dir / "results.json")
    kinds = _task_kinds(results)
    figures = {
        **{f"loss-{_file_name(a)}.png": loss_figure(a, recs, kinds) for a, recs in runs.items()},
        "replacements.png": replacements_figure(runs),
        "comparison.png": comparison_figure(results) if results else None,
        "time.png": time_figure(runs) if runs else None,
    }
    report = run_dir / "report.md"
    try:
        written = {}
        for name, figure in figures.items():
            if figure is not None:
                with atomic_path(run_dir / PLOTS / name) as tmp:
                    figure.savefig(tmp, format="png", dpi=DPI)
                written[name] = f"{PLOTS}/{name}"
        write_text(report, markdown(run_dir, runs, results, written))
    except OSError as err:
        where = err.filename or run_dir
        raise ReportError(
            f"cannot write the report to {where} ({err.strerror or err}): make {run_dir} and "
            f"{run_dir / PLOTS} writable folders, or copy the run's metrics.jsonl, results.json "
            "and config.yaml to a writable folder and run `tapdist report` on that"
        ) from None
    return report


# --- reading the run folder ---------------------------------------------------------------------


def read_metrics(path: Path) -> Records:
    """The round records of metrics.jsonl per algorithm, in round order (empty: the run has
    recorded no round, as one with ``federation.rounds: 0``); a cut-short last line (a run
    stopped while writing it) is left out with a warning."""
    if not path.is_file():
        raise ReportError(
            f"{path} does not exist: give the folder of a tapdist run "
            "(`tapdist train ... --run-dir RUN_DIR` writes it after the first round)"
        )
    lines = _read_text(path).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning(
                    "%s: line %d is cut short (the run stopped while writing it); "
                    "the report leaves it out",
                    path,
                    number,
                )
                continue
            raise ReportError(f"{path}, line {number}: not JSON ({err.msg})") from None
        _check_record(record, path, number)
        records.append(record)
    by_algorithm: dict[str, dict[int, dict]] = {}
    for record in records:  # a round recorded twice keeps its last record
        by_algorithm.setdefault(record["algorithm"], {})[record["round"]] = record
    return {a: [rounds[r] for r in sorted(rounds)] for a, rounds in by_algorithm.items()}


def _check_record(record: Any, path: Path, number: int) -> None:
    """Every field the report reads, of the type it reads it as."""
    wrong = [
        key
        for key, kind in _REQUIRED.items()
        if not isinstance(record, dict) or not isinstance(record.get(key), kind)
    ]
    if not wrong:
        wrong = _wrong_numbers(record)
    if wrong:
        raise ReportError(
            f"{path}, line {number}: not a tapdist round record ({', '.join(wrong)} missing or "
            "of the wrong type); is this the metrics.jsonl of a tapdist run?"
        )


def _wrong_numbers(record: dict) -> list[str]:
    """The fields of a round record that should hold numbers and do not: each client's stats
    (its rank an integer), the seconds, and the optional totals."""
    wrong = []
    for client, stats in record["clients"].items():
        where = f"clients.{client}"
        if not isinstance(stats, dict):
            wrong.append(where)
        elif not _is_integer(stats.get("rank")):
            wrong.append(f"{where}.rank")
        else:
            wrong += [f"{where}.{k}" for k, v in stats.items() if not _is_number(v)]
    wrong += [f"seconds.{k}" for k, v in record["seconds"].items() if not _is_number(v)]
    for key in ("replacements", "replacements_cumulative"):
        if key in record:
            counts = record[key]
            if not isinstance(counts, dict):
                wrong.append(key)
            else:
                wrong += [f"{key}.{k}" for k, v in counts.items() if not _is_number(v)]
    if "bytes_sent_per_rank" in record and not _is_number(record["bytes_sent_per_rank"]):
        wrong.append("bytes_sent_per_rank")
    return wrong


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_results(path: Path) -> dict | None:
    """results.json, or None (with a warning) when the run has not written it yet."""
    if not path.is_file():
        log.warning(
            "%s does not exist (the run has not finished): the report has no comparison", path
        )
        return None
    text = _read_text(path)
    try:
        results = json.loads(text)
        kind_averages(results)  # checks every entry's kind
    except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as err:
        raise ReportError(f"{path} is not a tapdist results file: {err}") from None
    return results


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise ReportError(
            f"{path} cannot be read ({err.strerror or err}); make it readable"
        ) from None


def _task_kinds(results: Mapping | None) -> dict[str, str]:
    """task -> kind, from results.json (empty without it)."""
    kinds = {}
    for clients in (results or {}).values():
        for tasks in clients.values():
            for task, entry in tasks.items():
                kinds.setdefault(task, entry["kind"])
    return kinds


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --- plots --------------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(
            "`tapdist report` draws its plots with matplotlib, which is not installed: "
            "pip install 'tapdist[plot]'"
        ) from None


def agg_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _grid(figure, count: int, columns: int, **kwargs) -> list:
    """``count`` axes in rows of ``columns``; cells beyond ``count`` are removed."""
    rows = math.ceil(count / columns)
    axes = list(figure.subplots(rows, columns, squeeze=False, **kwargs).flat)
    for spare in axes[count:]:
        spare.remove()
    return axes[:count]


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _integer_rounds(ax, rounds: Sequence[int]) -> None:
    """Round numbers on the x axis, spanning ``rounds`` (the same span in every panel)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(rounds) - 0.6, max(rounds) + 0.6)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def loss_series(records: Sequence[Mapping]) -> dict[str, dict[tuple[str, str], list]]:
    """task -> (model metric, client) -> [(round from 1, loss)] over the rounds the client was
    sampled in."""
    series: dict[str, dict[tuple[str, str], list]] = {}
    for record in records:
        for client, stats in record["clients"].items():
            for key, value in stats.items():
                metric, _, task = key.partition(".")
                if task and metric.endswith("_loss"):
                    points = series.setdefault(task, {}).setdefault((metric, client), [])
                    points.append((record["round"] + 1, float(value)))
    return series


def loss_figure(algorithm: str, records: Sequence[Mapping], kinds: Mapping[str, str]):
    """One panel per task, a line per client (colour) and model (line style); None when the
    records hold no per-task losses."""
    from matplotlib.lines import Line2D

    series = loss_series(records)
    if not series:
        return None
    # the tasks in results.json's order (clients', then each client's tasks), else by name
    order = {task: i for i, task in enumerate(kinds)}
    series = dict(
        sorted(series.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    )
    columns = min(3, len(series))
    figure = agg_figure(4.2 * columns + 2.0, 3.0 * math.ceil(len(series) / columns) + 0.7)
    clients = sorted({c for lines in series.values() for _, c in lines}, key=_client_order)
    colors = dict(zip(clients, _colors(len(clients))))
    metrics = list(dict.fromkeys(m for lines in series.values() for m, _ in lines))
    styles = {m: _LINE_STYLES[i % len(_LINE_STYLES)] for i, m in enumerate(metrics)}
    for ax, (task, lines) in zip(_grid(figure, len(series), columns), series.items()):
        for (metric, client), points in sorted(lines.items(), key=lambda x: _client_order(x[0][1])):
            rounds, values = zip(*points)
            ax.plot(rounds, values, styles[metric], color=colors[client], marker="o", ms=3, lw=1.3)
        kind = f" ({kinds[task]})" if task in kinds else ""
        ax.set_title(f"{task}{kind}")
        ax.set_ylabel("training loss")
        _integer_rounds(ax, [r["round"] + 1 for r in records])
    handles = [
        Line2D([], [], color=colors[c], marker="o", ms=3, label=f"client {c}") for c in clients
    ]
    if len(metrics) > 1:
        handles += [Line2D([], [], ls="none", label=" ")]
        handles += [
            Line2D([], [], ls=styles[m], color="0.2", label=MODEL_LABELS.get(m, m)) for m in metrics
        ]
    figure.legend(handles=handles, loc="outside right upper", ncols=math.ceil(len(handles) / 24))
    models = " and ".join(MODEL_LABELS.get(m, m) for m in metrics)
    figure.suptitle(f"{algorithm}: training loss of the {models}, per client and task")
    return figure


def replacements_figure(runs: Records):
    """Per algorithm that replaces components (TAP) and task kind: replacements each round
    (bars) and cumulative (line); None when no algorithm replaces."""
    rows = {a: recs for a, recs in runs.items() if any("replacements" in r for r in recs)}
    if not rows:
        return None
    kinds = [
        k
        for k in METRICS
        if any(k in r.get("replacements", {}) for rs in rows.values() for r in rs)
    ]
    figure = agg_figure(3.3 * len(kinds) + 0.4, 2.9 * len(rows) + 0.6)
    axes = figure.subplots(len(rows), len(kinds), squeeze=False, sharey="row")
    for row, (algorithm, records) in zip(axes, rows.items()):
        rounds = [r["round"] + 1 for r in records]
        for ax, kind in zip(row, kinds):
            now = [r.get("replacements", {}).get(kind, 0) for r in records]
            total = [r.get("replacements_cumulative", {}).get(kind, 0) for r in records]
            ax.bar(rounds, now, color="#9ecae1", label="this round")
            marker = "o" if len(rounds) <= 30 else None
            ax.plot(rounds, total, color="#08519c", marker=marker, ms=3, label="cumulative")
            ax.set_title(f"{algorithm} · {kind}")
            ax.yaxis.get_major_locator().set_params(integer=True)
            _integer_rounds(ax, rounds)
        row[0].set_ylabel("replacements")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper")
    figure.suptitle("Components replaced in personal models by the global copy's, per task kind")
    return figure


def comparison_figure(results: Mapping):
    """One panel per task kind: each method's mean primary metric, the best one highlighted."""
    averages = kind_averages(results)
    methods = list(results)
    kinds = [k for k in METRICS if any(k in averages[m] for m in methods)]
    if not kinds:
        return None
    counts = {k: _entries_of_kind(results[methods[0]], k) for k in kinds}
    columns = min(4, len(kinds))
    rows = math.ceil(len(kinds) / columns)
    figure = agg_figure(3.4 * columns + 1.0, (0.42 * len(methods) + 1.3) * rows + 0.5)
    colors = dict(zip(methods, _colors(len(methods))))
    for ax, kind in zip(_grid(figure, len(kinds), columns), kinds):
        metric = PRIMARY[kind][0]
        _dot_panel(ax, metric, {m: averages[m].get(kind) for m in methods}, colors)
        entries = f"{counts[kind]} client-task{'s' * (counts[kind] != 1)}"
        ax.set_title(f"{kind} ({entries})\n{_axis_label(metric)}", fontsize=10)
    figure.suptitle("Methods per task kind: mean primary metric on held-out data (best in bold)")
    return figure


def _dot_panel(ax, metric: str, values: Mapping[str, float | None], colors: Mapping) -> None:
    from matplotlib.ticker import MaxNLocator

    scale = 100.0 if metric in FRACTIONS else 1.0
    shown = {m: v * scale for m, v in values.items() if v is not None and not math.isnan(v)}
    positions = {m: -i for i, m in enumerate(values)}  # first method on top
    best = None
    if shown:
        pick = max if DIRECTION.get(metric) == "max" else min
        best = pick(shown, key=shown.get)
    for method, value in shown.items():
        y = positions[method]
        ax.plot([value], [y], "o", ms=8, color=colors[method])
        ax.annotate(
            format_value(metric, value / scale),
            (value, y),
            xytext=(7, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
            fontweight="bold" if method == best else "normal",
        )
    ax.set_yticks(list(positions.values()), list(positions))
    for label in ax.get_yticklabels():
        label.set_fontweight("bold" if label.get_text() == best else "normal")
    if shown:
        low, high = min(shown.values()), max(shown.values())
        span = (high - low) or abs(high) * 0.1 or 1.0
        ax.set_xlim(low - 0.3 * span, high + 0.6 * span)
    ax.set_ylim(-len(values) + 0.4, 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
    ax.grid(axis="x", alpha=0.3)


def _axis_label(metric: str) -> str:
    unit = " (%)" if metric in FRACTIONS else ""
    better = {"max": ", higher is better", "min": ", lower is better"}.get(
        DIRECTION.get(metric), ""
    )
    return f"{metric}{unit}{better}"


def _entries_of_kind(clients: Mapping, kind: str) -> int:
    return sum(entry["kind"] == kind for tasks in clients.values() for entry in tasks.values())


def phase_seconds(record: Mapping) -> dict[str, float]:
    """A round's seconds by phase: the phases of the busiest rank's clients (that rank decides
    when the all_reduce can start), its other client work (loading states, batches), and the
    aggregation (the all_reduce and averaging, as the server saw it). They add up to the
    server's round seconds."""
    busy: dict[int, float] = {}
    for stats in record["clients"].values():
        busy[stats["rank"]] = busy.get(stats["rank"], 0.0) + stats.get("train_s", 0.0)
    phases: dict[str, float] = {}
    if busy:
        busiest = max(busy, key=busy.get)
        for stats in record["clients"].values():
            if stats["rank"] == busiest:
                for key, value in stats.items():
                    if key.endswith("_s") and key != "train_s":
                        phases[key] = phases.get(key, 0.0) + value
        phases["other client work"] = max(busy[busiest] - sum(phases.values()), 0.0)
    seconds = record["seconds"]
    trained = max(busy.values(), default=0.0)
    phases["aggregation"] = max(seconds.get("round", trained) - trained, 0.0)
    return phases


def time_figure(runs: Records):
    """Per algorithm, a stacked bar per round of :func:`phase_seconds`."""
    per_algorithm = {a: [phase_seconds(r) for r in recs] for a, recs in runs.items()}
    names = list(dict.fromkeys(p for rows in per_algorithm.values() for row in rows for p in row))
    names.sort(key=lambda p: (p in ("other client work", "aggregation"), p == "aggregation"))
    colors = dict(zip(names, _colors(len(names))))
    figure = agg_figure(9.0, 2.7 * len(runs) + 0.7)
    axes = figure.subplots(len(runs), 1, squeeze=False)[:, 0]
    for ax, (algorithm, rows) in zip(axes, per_algorithm.items()):
        rounds = [r["round"] + 1 for r in runs[algorithm]]
        bottom = [0.0] * len(rows)
        for name in names:
            if not any(name in row for row in rows):
                continue
            heights = [row.get(name, 0.0) for row in rows]
            ax.bar(
                rounds,
                heights,
                bottom=bottom,
                color=colors[name],
                label=PHASE_LABELS.get(name, name),
            )
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_ylim(0, max(bottom, default=0.0) * 1.08 or 1.0)
        ax.set_title(algorithm)
        ax.set_ylabel("seconds")
        _integer_rounds(ax, rounds)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    figure.suptitle("Seconds per round: the busiest rank's phases, then the aggregation")
    return figure


def _client_order(client: str) -> tuple:
    return (0, int(client)) if client.isdigit() else (1, client)


# --- report.md ----------------------------------------------------------------------------------


def markdown(
    run_dir: Path, runs: Records, results: Mapping | None, plots: Mapping[str, str]
) -> str:
    """The text of report.md; ``plots`` maps each written PNG's name to its relative path."""
    config = _read_config(run_dir / "config.yaml")
    name = config.get("run", {}).get("name") or run_dir.name
    parts = [f"# Report: {name}", "", f"Run folder `{run_dir}`.", "", "## Rounds", ""]
    parts += [_rounds_table(runs, config) if runs else _no_rounds(config), ""]
    parts += ["## Comparison", ""]
    if results:
        parts += [
            "Mean of each task kind's primary metric over every (client, task) of that kind, on "
            "held-out data; the best method in bold. `results.md` has every client, task and "
            "metric.",
            "",
            format_table(results),
            "",
        ]
        parts += _image(plots, "comparison.png", "methods per task kind")
    else:
        parts += ["No results.json yet: the run has not finished.", ""]
    if runs:
        parts += _round_sections(runs, plots)
    return "\n".join(parts)


def _round_sections(runs: Records, plots: Mapping[str, str]) -> list[str]:
    """The sections of report.md drawn from the round records."""
    parts = ["## Training loss", ""]
    parts += [
        "Loss on each client's training batches in the rounds it was sampled in (one marker per "
        "such round). For TAP, the global copy (solid) and the personal model (dashed).",
        "",
    ]
    for algorithm in runs:
        parts += [f"### {algorithm}", ""]
        parts += _image(plots, f"loss-{_file_name(algorithm)}.png", f"{algorithm} training loss")
    if "replacements.png" in plots:
        parts += ["## Replacements", ""]
        parts += [
            "Tasks whose components the global copy replaced in the personal model, per task "
            "kind: each round (bars) and in total so far (line).",
            "",
        ]
        parts += _image(plots, "replacements.png", "replacements per task kind")
    parts += ["## Time per round", ""]
    parts += [
        "The busiest rank's client phases (it decides when the round's all_reduce can start), "
        "its other client work (loading states and batches), then the aggregation as the server "
        "saw it (the all_reduce and the averaging); stacked, they make the round's seconds.",
        "",
    ]
    parts += _image(plots, "time.png", "seconds per round by phase")
    return parts


def _no_rounds(config: Mapping) -> str:
    planned = config.get("federation", {}).get("rounds")
    if planned == 0:
        return (
            "No rounds: the run's federation.rounds is 0, so each method's results come from "
            "the initial model (fine-tuned locally where the method fine-tunes)."
        )
    return "metrics.jsonl holds no rounds."


def _image(plots: Mapping[str, str], name: str, alt: str) -> list[str]:
    return [f"![{alt}]({plots[name]})", ""] if name in plots else []


def _rounds_table(runs: Records, config: Mapping) -> str:
    planned = config.get("federation", {}).get("rounds")
    header = "| algorithm | rounds | mean s per round | s in rounds | bytes sent per rank | "
    header += "replacements |\n|---|--:|--:|--:|--:|--:|"
    lines = [header]
    for algorithm, records in runs.items():
        seconds = [r["seconds"].get("round", 0.0) for r in records]
        sent = sum(r.get("bytes_sent_per_rank", 0) for r in records)
        total = records[-1].get("replacements_cumulative")
        done = f"{len(records)}" + (f" of {planned}" if planned else "")
        lines.append(
            f"| {algorithm} | {done} | {sum(seconds) / len(seconds):.2f} | {sum(seconds):.1f} | "
            f"{format_bytes(sent)} | {sum(total.values()) if total else '–'} |"
        )
    return "\n".join(lines)


def _read_config(path: Path) -> dict:
    """The run's resolved config, or {} when it is missing or unreadable (it only names
    things in the report)."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}
