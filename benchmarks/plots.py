"""PNG plots of the latest benchmark results for RESULTS.md.

Reads the JSON files the other scripts wrote under ``benchmarks/results/`` and draws, for each
present: scaling efficiency over world sizes (``scaling.png``), memory and round time over
clients per rank (``clients.png``), the aggregation against a raw all_reduce (``comm.png``), and
the client-round micro-batch times against their baselines (``round.png``, from
``round-h200.json``, the GPU run RESULTS.md shows, else ``round.json``).

    python -m benchmarks.plots [--results DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS, run_main
from benchmarks.round import PEAKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.plots", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON files")
    args = parser.parse_args(argv)
    from tapdist.report import agg_figure  # matplotlib, Agg canvas, no pyplot state

    drawn = []
    for names, draw in (
        (["scaling"], _scaling),
        (["clients"], _clients),
        (["comm"], _comm),
        (["round-h200", "round"], _round),
    ):
        sources = [args.results / f"{name}.json" for name in names]
        source = next((path for path in sources if path.exists()), None)
        if source is None:
            print(f"{' or '.join(map(str, sources))}: not there, skipped")
            continue
        fig = draw(agg_figure, json.loads(source.read_text()), args.results)
        if fig is None:
            print(f"{source}: nothing to draw, skipped")
            continue
        target = args.results / f"{names[0].split('-')[0]}.png"
        fig.savefig(target, dpi=110, bbox_inches="tight")
        drawn.append(target)
        print(f"wrote {target}")
    return 0 if drawn else 1


def _scaling(figure, data: dict, results: Path):
    fig = figure(9, 3.6)
    speed, eff = fig.subplots(1, 2)
    for mode, marker in (("weak", "o"), ("strong", "s")):
        rows = sorted((r for r in data["rows"] if r["mode"] == mode), key=lambda r: r["world"])
        worlds = [r["world"] for r in rows]
        speed.plot(worlds, [r["client_rounds_per_s"] for r in rows], marker=marker, label=mode)
        eff.plot(worlds, [r["efficiency"] for r in rows], marker=marker, label=mode)
    eff.axhline(0.9, color="grey", linestyle=":", label="target (weak) 0.9")
    speed.set(title="round throughput", xlabel="ranks", ylabel="client-rounds / s")
    eff.set(
        title="efficiency against the fewest ranks",
        xlabel="ranks",
        ylabel="efficiency",
        ylim=(0, 1.1),
    )
    for ax in (speed, eff):
        ax.legend()
        ax.grid(alpha=0.3)
        ax.set_xticks(sorted({r["world"] for r in data["rows"]}))
    over = data["settings"].get("oversubscribed_world_sizes") or []
    note = f"; {', '.join(map(str, over))} ranks oversubscribe the cores" if over else ""
    first = data["rows"][0]
    where = "CPU" if first["device"] == "cpu" else first["device"].split(":")[0].upper()
    fig.suptitle(f"Scaling, {first['backend']} on {where} ({data['hardware']['cpus']} cores{note})")
    return fig


def _clients(figure, data: dict, results: Path):
    rows = sorted(data["rows"], key=lambda r: r["clients_per_rank"])
    n = [r["clients_per_rank"] for r in rows]
    fig = figure(9, 3.6)
    memory, seconds = fig.subplots(1, 2)
    rss = [r["memory_after_fill"]["rss"] / 2**20 for r in rows]
    state = [r["clients_per_rank"] * r["state_bytes_per_client"] / 2**20 for r in rows]
    memory.plot(n, rss, marker="o", label="resident memory after every client trained")
    memory.plot(n, [rss[0] - state[0] + s for s in state], linestyle="--", label="first + states")
    memory.set(title="memory", xlabel="clients on the rank", ylabel="MiB", xscale="log")
    seconds.plot(n, [r["round_s"] for r in rows], marker="o", label="round (same clients/round)")
    seconds.set(title="round time", xlabel="clients on the rank", ylabel="s", xscale="log")
    seconds.set_ylim(bottom=0)
    for ax in (memory, seconds):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    cuda = any("cuda_allocated" in r["memory_after_fill"] for r in rows)
    fig.suptitle(f"Virtual clients per rank ({'GPU' if cuda else 'CPU'})")
    return fig


def _comm(figure, data: dict, results: Path):
    rows = [r for r in data["timing"] if r["efficiency"] is not None]
    if not rows:  # one rank sends nothing: no efficiency to draw
        return None
    labels = [f"{r['world']} ranks\n{r['dtype']}" for r in rows]
    fig = figure(9, 3.6)
    ax = fig.subplots()
    x = range(len(rows))
    ax.bar(
        [i - 0.2 for i in x], [r["all_reduce_efficiency"] for r in rows], 0.4, label="collective"
    )
    ax.bar([i + 0.2 for i in x], [r["efficiency"] for r in rows], 0.4, label="whole path")
    ax.axhline(0.9, color="grey", linestyle=":", label="target 0.9")
    ax.set_xticks(list(x), labels)
    title = f"Aggregation against a raw all_reduce ({rows[0]['backend']}, "
    title += f"{data['hardware']['cpus']} CPUs)"
    ax.set(ylabel="raw all_reduce s / union s", title=title)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig


def _round(figure, data: dict, results: Path):
    cases = data["results"]
    fig = figure(8, 3.6)
    ax = fig.subplots()
    labels, train, bare = [], [], []
    for r in cases:
        graphs = "CUDA graphs" if r.get("cuda_graphs") else "eager"
        labels.append(f"{Path(r['config']).stem}\n{r['amp']}, {graphs}")
        train.append(r["micro_batch_ms"])
        bare.append(r["bare_micro_batch_ms"])
    x = range(len(cases))
    ax.bar([i - 0.2 for i in x], train, 0.4, label="training micro-batch")
    ax.bar([i + 0.2 for i in x], bare, 0.4, label="bare forward + backward (eager)")
    peak = next((p.get("bf16") for key, p in PEAKS if key in cases[0]["device"]), None)
    if peak is not None:  # a device without a known peak (a CPU) has no floor to draw
        for i, r in enumerate(cases):
            floor = r["tflop_per_micro_batch"] * 1e12 / peak * 1e3
            ax.plot([i - 0.4, i + 0.4], [floor] * 2, color="grey", linestyle=":")
        ax.plot([], [], color="grey", linestyle=":", label="bf16 peak floor")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set(
        ylabel="ms per micro-batch of 32", title=f"Client-round micro-batch, {cases[0]['device']}"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


if __name__ == "__main__":
    raise SystemExit(run_main(main))
