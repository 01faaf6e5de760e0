"""results.json and results.md: every method's held-out metrics per client and task.

Layout: ``{method: {client_id: {task: {"kind": kind, "primary": metric, <metric>: value}}}}``,
methods in the order they ran. results.md compares the methods: per task kind (the mean of the
kind's primary metric over every (client, task) of that kind), per client and task, and every
metric averaged per kind. The best method of each row is in bold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from tapdist.checkpoint import write_text
from tapdist.evaluate import METRICS, PRIMARY

Results = Mapping[str, Mapping[str, Mapping[str, Mapping]]]  # method -> client -> task -> entry

# shown in percent; every other metric as a plain number
FRACTIONS = ("accuracy", "token_f1", "rouge_l", "exact_match")
# direction of every reported metric, primary or not
DIRECTION: dict[str, str] = {
    "accuracy": "max",
    "loss": "min",
    "mse": "min",
    "token_ce": "min",
    "perplexity": "min",
    "token_f1": "max",
    "rouge_l": "max",
    "exact_match": "max",
}
_ARROW = {"max": "↑", "min": "↓"}
_MISSING = "–"


def task_entry(kind: str, metrics: Mapping[str, float]) -> dict:
    """One (client, task) entry: its kind, its primary metric's name, then the metrics."""
    if kind not in PRIMARY:
        raise ValueError(f"task kind '{kind}' is unknown; accepted: {', '.join(PRIMARY)}")
    primary = PRIMARY[kind][0]
    if primary not in metrics:
        raise ValueError(f"a {kind} entry needs its primary metric '{primary}'")
    return {"kind": kind, "primary": primary, **{m: float(v) for m, v in metrics.items()}}


def write_results(run_dir: Path, results: Results, title: str = "") -> None:
    """Write RUN_DIR/results.json and RUN_DIR/results.md, each atomically; both texts are built
    before either file is touched, so invalid results leave the previous files as they were."""
    run_dir = Path(run_dir)
    results = _string_keys(results)
    texts = {
        "results.json": json.dumps(results, indent=2) + "\n",
        "results.md": comparison_table(results, title),
    }
    for name, text in texts.items():
        write_text(run_dir / name, text)


def _string_keys(results: Results) -> dict:
    # JSON object keys are strings: make client ids strings here so the file reads back equal
    return {
        method: {str(client): dict(tasks) for client, tasks in clients.items()}
        for method, clients in results.items()
    }


# --- averages -----------------------------------------------------------------------------------


def metric_averages(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """method -> kind -> metric -> mean over that method's (client, task) entries of the kind."""
    out = {}
    for method, clients in results.items():
        values: dict[str, dict[str, list[float]]] = {}
        for entry in _entries(clients):
            kind = _kind(entry)
            for metric, value in _metrics(entry).items():
                values.setdefault(kind, {}).setdefault(metric, []).append(float(value))
        out[method] = {
            kind: {m: sum(v) / len(v) for m, v in metrics.items()}
            for kind, metrics in _kind_order(values).items()
        }
    return out


def kind_averages(results: Results) -> dict[str, dict[str, float]]:
    """method -> kind -> mean of the kind's primary metric over the entries of that kind."""
    return {
        method: {
            kind: metrics[PRIMARY[kind][0]]
            for kind, metrics in kinds.items()
            if PRIMARY[kind][0] in metrics
        }
        for method, kinds in metric_averages(results).items()
    }


def _entries(clients: Mapping[str, Mapping[str, Mapping]]) -> list[Mapping]:
    return [entry for tasks in clients.values() for entry in tasks.values()]


def _kind(entry: Mapping) -> str:
    kind = entry.get("kind")
    if kind not in PRIMARY:
        raise ValueError(f"result entry {dict(entry)} has no known kind ({', '.join(PRIMARY)})")
    return kind


def _metrics(entry: Mapping) -> dict[str, float]:
    return {k: v for k, v in entry.items() if k not in ("kind", "primary")}


def _kind_order(by_kind: Mapping[str, object]) -> dict:
    """The kinds present, in the canonical order of task kinds."""
    return {kind: by_kind[kind] for kind in METRICS if kind in by_kind}


# --- markdown -----------------------------------------------------------------------------------


def comparison_table(results: Results, title: str = "") -> str:
    """The markdown of results.md."""
    parts = [f"# {title or 'Results'}", ""]
    if not results:
        return "\n".join([*parts, "No results.", ""])
    parts += [
        "Accuracy, token F1, ROUGE-L and exact match are in percent; the best method of each "
        "row is in bold (↑: higher is better, ↓: lower is better).",
        "",
        "## Per task kind",
        "",
        "Mean of each kind's primary metric over every (client, task) of that kind.",
        "",
        format_table(results),
        "",
        "## Per client and task",
        "",
        _client_table(results),
        "",
        "## All metrics (mean per task kind)",
        "",
        _all_metrics(results),
    ]
    return "\n".join(parts)


def format_table(results: Results) -> str:
    """The per-kind summary: rows are task kinds, columns methods (also for a terminal)."""
    methods = list(results)
    averages = kind_averages(results)
    kinds = _kind_order({k: None for m in methods for k in averages[m]})
    rows = [
        [f"{kind} · {_label(PRIMARY[kind][0])}"]
        + _cells(PRIMARY[kind][0], [averages[m].get(kind) for m in methods])
        for kind in kinds
    ]
    return _markdown(["task kind · metric", *methods], rows)


def _client_table(results: Results) -> str:
    methods = list(results)
    rows = []
    for client, task, kind in _client_tasks(results):
        metric = PRIMARY[kind][0]
        values = [results[m].get(client, {}).get(task, {}).get(metric) for m in methods]
        rows.append([client, task, kind, _label(metric), *_cells(metric, values)])
    return _markdown(["client", "task", "kind", "metric", *methods], rows, labels=4)


def _client_tasks(results: Results) -> list[tuple[str, str, str]]:
    """Every (client, task, kind) some method holds: clients, and each client's tasks, in
    first-seen order."""
    seen: dict[str, dict[str, str]] = {}
    for clients in results.values():
        for client, tasks in clients.items():
            for task, entry in tasks.items():
                seen.setdefault(str(client), {}).setdefault(task, _kind(entry))
    return [(client, task, kind) for client, tasks in seen.items() for task, kind in tasks.items()]


def _all_metrics(results: Results) -> str:
    methods = list(results)
    averages = metric_averages(results)
    kinds = _kind_order({k: None for m in methods for k in averages[m]})
    sections = []
    for kind in kinds:
        metrics = list(METRICS[kind])
        metrics += sorted({x for m in methods for x in averages[m].get(kind, {})} - set(metrics))
        rows = [
            [_label(x), *_cells(x, [averages[m].get(kind, {}).get(x) for m in methods])]
            for x in metrics
        ]
        sections += [f"### {kind}", "", _markdown(["metric", *methods], rows), ""]
    return "\n".join(sections)


def _label(metric: str) -> str:
    unit = " (%)" if metric in FRACTIONS else ""
    arrow = _ARROW.get(DIRECTION.get(metric, ""), "")
    return f"{metric}{unit} {arrow}".rstrip()


def _cells(metric: str, values: list[float | None]) -> list[str]:
    """Formatted values, the best ones (by the metric's direction) in bold."""
    known = [v for v in values if v is not None and not math.isnan(v)]
    direction = DIRECTION.get(metric)
    best = (max if direction == "max" else min)(known) if known and direction else None
    return [_cell(metric, v, v is not None and v == best) for v in values]


def _cell(metric: str, value: float | None, bold: bool) -> str:
    if value is None:
        return _MISSING
    text = format_value(metric, value)
    return f"**{text}**" if bold else text


def format_value(metric: str, value: float) -> str:
    """Fractions in percent (2 decimals), perplexity 2 decimals, losses 4 decimals, anything
    else (mse) to 4 significant digits."""
    if math.isnan(value):
        return "nan"
    if metric in FRACTIONS:
        return f"{100.0 * value:.2f}"
    if metric == "perplexity":
        return f"{value:.2f}"
    if metric in ("loss", "token_ce"):
        return f"{value:.4f}"
    return f"{value:#.4g}"


def _markdown(header: list[str], rows: list[list[str]], labels: int = 1) -> str:
    """A markdown table: ``labels`` left-aligned label columns, then right-aligned numbers."""
    align = ["---"] * labels + ["--:"] * (len(header) - labels)
    lines = [_row(header), "|" + "|".join(align) + "|"]
    return "\n".join(lines + [_row(r) for r in rows])


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
