"""results.json and results.md: layout, averages, the comparison tables, atomic writes."""

from __future__ import annotations

import json
import math

import pytest

from tapdist.results import (
    comparison_table,
    format_table,
    format_value,
    kind_averages,
    metric_averages,
    task_entry,
    write_results,
)


def cls(accuracy: float, loss: float = 1.0) -> dict:
    return task_entry("image_cls", {"accuracy": accuracy, "loss": loss})


def gen(mse: float) -> dict:
    return task_entry("image_gen", {"mse": mse})


def qa(token_ce: float) -> dict:
    metrics = {"token_ce": token_ce, "perplexity": math.exp(token_ce), "token_f1": 0.5}
    return task_entry("text_gen", {**metrics, "rouge_l": 0.4, "exact_match": 0.1})


# tap wins image_cls (max), fedavg wins image_gen (min), local wins text_gen (min)
RESULTS = {
    "tap": {"0": {"objects": cls(0.75)}, "1": {"objects": cls(0.5), "recon": gen(0.02)}},
    "fedavg": {"0": {"objects": cls(0.5)}, "1": {"objects": cls(0.25), "recon": gen(0.01)}},
    "local": {"0": {"objects": cls(0.25), "vqa": qa(20.0)}, "1": {"recon": gen(0.03)}},
}


def summary_cells(table: str, kind: str, methods: list[str]) -> dict[str, str]:
    """method -> cell of ``kind``'s row in a markdown table whose label column comes first."""
    row = next(line for line in table.splitlines() if line.startswith(f"| {kind} "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    return dict(zip(methods, cells[1:]))


def test_task_entry_adds_kind_and_primary():
    assert cls(0.5) == {"kind": "image_cls", "primary": "accuracy", "accuracy": 0.5, "loss": 1.0}
    assert qa(3.0)["primary"] == "token_ce"
    with pytest.raises(ValueError, match="video_cls"):
        task_entry("video_cls", {"accuracy": 1.0})
    with pytest.raises(ValueError, match="mse"):
        task_entry("image_gen", {"loss": 1.0})


def test_kind_averages_are_means_of_the_primary_metric():
    averages = kind_averages(RESULTS)
    assert list(averages) == ["tap", "fedavg", "local"]
    assert averages["tap"] == {"image_cls": pytest.approx(0.625), "image_gen": 0.02}
    assert averages["fedavg"]["image_cls"] == pytest.approx(0.375)
    assert averages["local"] == {"image_cls": 0.25, "image_gen": 0.03, "text_gen": 20.0}
    assert list(averages["local"]) == ["image_cls", "image_gen", "text_gen"]  # canonical order
    assert metric_averages(RESULTS)["local"]["text_gen"]["token_f1"] == 0.5


def test_write_results_round_trips(tmp_path):
    write_results(tmp_path / "run", RESULTS, title="smoke")
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == RESULTS
    markdown = (tmp_path / "run" / "results.md").read_text()
    assert markdown == comparison_table(RESULTS, "smoke")
    assert markdown.startswith("# smoke\n")


def test_client_ids_are_written_as_strings(tmp_path):
    write_results(tmp_path, {"tap": {3: {"objects": cls(0.5)}}})
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "tap": {"3": {"objects": cls(0.5)}}
    }


def test_files_are_replaced_whole_and_no_temporary_is_left(tmp_path):
    write_results(tmp_path, RESULTS)
    write_results(tmp_path, {"tap": RESULTS["tap"]})  # over the previous files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
    assert list(json.loads((tmp_path / "results.json").read_text())) == ["tap"]
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="kind"):  # invalid results touch neither file
        write_results(tmp_path, {"tap": {"0": {"objects": {"accuracy": 1.0}}}})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_table_has_every_method_and_kind():
    table = comparison_table(RESULTS)
    header = next(line for line in table.splitlines() if line.startswith("| task kind"))
    assert all(f" {m} " in header for m in RESULTS)
    summary = format_table(RESULTS)
    for kind, label in [
        ("image_cls", "accuracy (%) ↑"),
        ("image_gen", "mse ↓"),
        ("text_gen", "token_ce ↓"),
    ]:
        assert f"| {kind} · {label} |" in summary
        assert f"### {kind}" in table  # the all-metrics section
    assert "text_cls" not in table  # only kinds present
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line[:4] in ("| 0 ", "| 1 ")]
    # one row per (client, task), grouped by client
    assert rows == [["| 0", "objects"], ["| 0", "vqa"], ["| 1", "objects"], ["| 1", "recon"]]
    for metric in ("loss ↓", "token_ce ↓", "token_f1 (%) ↑", "rouge_l (%) ↑", "exact_match (%) ↑"):
        assert f"| {metric} |" in table


def test_best_method_is_bold_for_max_and_min_metrics():
    methods = list(RESULTS)
    summary = format_table(RESULTS)
    assert summary_cells(summary, "image_cls", methods) == {
        "tap": "**62.50**",
        "fedavg": "37.50",
        "local": "25.00",
    }
    assert summary_cells(summary, "image_gen", methods) == {
        "tap": "0.02000",
        "fedavg": "**0.01000**",
        "local": "0.03000",
    }
    # text_gen: only local has it; the others show a dash
    assert summary_cells(summary, "text_gen", methods) == {
        "tap": "–",
        "fedavg": "–",
        "local": "**20.0000**",
    }


def test_ties_are_all_bold_and_per_client_rows_compare_too():
    results = {"a": {"0": {"objects": cls(0.5)}}, "b": {"0": {"objects": cls(0.5)}}}
    assert summary_cells(format_table(results), "image_cls", ["a", "b"]) == {
        "a": "**50.00**",
        "b": "**50.00**",
    }
    row = next(line for line in comparison_table(RESULTS).splitlines() if "| 1 | recon |" in line)
    assert row.endswith("| 0.02000 | **0.01000** | 0.03000 |")


def test_number_formats():
    assert format_value("accuracy", 0.8125) == "81.25"
    assert format_value("mse", 0.0123456) == "0.01235"
    assert format_value("mse", 0.02) == "0.02000"
    assert format_value("perplexity", 12.3456) == "12.35"
    assert format_value("loss", 1.234567) == "1.2346"
    assert format_value("mse", float("nan")) == "nan"


def test_empty_results():
    assert "No results" in comparison_table({}, "empty")
