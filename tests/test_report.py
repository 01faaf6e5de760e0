"""`tapdist report` on a real tiny run (plots, report.md, a run cut short, bad folders) and
`tapdist bench` on a throwaway benchmarks folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import textwrap

import numpy as np
import pytest
from conftest import SMOKE_CONFIG
from PIL import Image

import tapdist.cli
from tapdist.cli import CommandError, main, run_benchmark
from tapdist.report import ReportError, phase_seconds, read_metrics, write_report

PLOTS = ["loss-tap.png", "loss-local.png", "replacements.png", "comparison.png", "time.png"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """TAP and Local, 3 rounds of the smoke federation."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    args = ["train", str(SMOKE_CONFIG), "--run-dir", str(run_dir)]
    assert main([*args, "--set", "federation.baselines=[local]"]) == 0
    return run_dir


def copy_of(run_dir, tmp_path, *names):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in names:
        shutil.copy(run_dir / name, copy / name)
    return copy


def assert_real_plot(path):
    """A valid PNG of a sensible size with real content: many colours, much non-white."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert 600 <= width <= 2400 and 250 <= height <= 2400, (path.name, image.size)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, path.name
    assert (pixels.min(axis=2) < 200).mean() > 0.02, path.name


def test_report_writes_plots_and_markdown(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.md")
    text = (run_dir / "report.md").read_text()
    for name in PLOTS:
        assert_real_plot(run_dir / "report" / name)
        assert f"](report/{name})" in text
    assert "| task kind · metric | tap | fedavg | fedavg_ft | local |" in text
    assert "| tap | 3 of 3 |" in text and "| local | 3 of 3 |" in text
    assert not list((run_dir / "report").glob(".*.tmp"))  # atomic writes leave no temp files


def test_a_cut_short_last_line_is_left_out_with_a_warning(run_dir, tmp_path, capsys):
    copy = copy_of(run_dir, tmp_path, "metrics.jsonl", "results.json", "config.yaml")
    whole = (copy / "metrics.jsonl").read_text()
    with (copy / "metrics.jsonl").open("a") as out:
        out.write(whole.splitlines()[0][:150])  # a run killed while writing a line
    assert main(["report", str(copy)]) == 0
    assert "line 7 is cut short" in capsys.readouterr().err
    assert [len(r) for r in read_metrics(copy / "metrics.jsonl").values()] == [3, 3]
    assert (copy / "report" / "time.png").is_file()


def test_a_run_without_results_reports_its_rounds(run_dir, tmp_path, capsys):
    copy = copy_of(run_dir, tmp_path, "metrics.jsonl")
    assert main(["report", str(copy)]) == 0
    assert "has not finished" in capsys.readouterr().err
    text = (copy / "report.md").read_text()
    assert "No results.json yet" in text and "comparison.png" not in text
    assert not (copy / "report" / "comparison.png").exists()
    assert_real_plot(copy / "report" / "loss-tap.png")


def test_without_matplotlib_the_error_says_what_to_install(run_dir, tmp_path, monkeypatch, capsys):
    copy = copy_of(run_dir, tmp_path, "metrics.jsonl")
    for module in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, module, None)  # every import of matplotlib fails
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'tapdist[plot]'" in err and "Traceback" not in err
    assert not (copy / "report.md").exists()


@pytest.mark.parametrize(
    "setup, words",
    [
        (None, ["run folder", "does not exist"]),
        ("", ["metrics.jsonl does not exist", "tapdist train"]),
        ("\n", ["holds no rounds"]),
        ('{"round": 0}\n{"round": 1}\n', ["line 1", "not a tapdist round record", "algorithm"]),
        ("not json\n{}\n", ["line 1: not JSON"]),
    ],
)
def test_bad_run_folders_get_clear_messages(tmp_path, capsys, setup, words):
    folder = tmp_path / "run"
    if setup is not None:
        folder.mkdir()
        if setup:
            (folder / "metrics.jsonl").write_text(setup)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tapdist report: ") and "Traceback" not in err
    for word in words:
        assert word in err


def test_a_run_of_no_rounds_reports_its_comparison(run_dir, tmp_path, capsys):
    """federation.rounds: 0 is a valid run: an empty metrics.jsonl and a results.json."""
    copy = copy_of(run_dir, tmp_path, "results.json", "config.yaml")
    (copy / "metrics.jsonl").write_text("")  # what a run of no rounds leaves
    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(re.sub(r"\n  rounds: \d+\n", "\n  rounds: 0\n", config))
    assert main(["report", str(copy)]) == 0
    text = (copy / "report.md").read_text()
    assert "federation.rounds is 0" in text
    assert "| task kind · metric | tap | fedavg | fedavg_ft | local |" in text
    assert "](report/comparison.png)" in text and "Time per round" not in text
    assert sorted(p.name for p in (copy / "report").iterdir()) == ["comparison.png"]
    assert_real_plot(copy / "report" / "comparison.png")


def first_client(record: dict) -> dict:
    return next(iter(record["clients"].values()))


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: first_client(r).pop("rank"), ".rank"),
        (lambda r: first_client(r).update(rank="0"), ".rank"),
        (lambda r: first_client(r).update({"global_loss.objects": None}), "global_loss.objects"),
        (lambda r: first_client(r).update(global_s=True), ".global_s"),
        (lambda r: r["clients"].update({"9": [1, 2]}), "clients.9"),
        (lambda r: r["seconds"].update(round="3s"), "seconds.round"),
        (lambda r: r.update(replacements=[1]), "replacements"),
        (lambda r: r.update(bytes_sent_per_rank=None), "bytes_sent_per_rank"),
    ],
    ids=["no rank", "rank text", "loss null", "bool", "stats list", "seconds", "totals", "bytes"],
)
def test_hand_edited_round_records_are_refused_naming_the_line(
    run_dir, tmp_path, capsys, edit, field
):
    """A record whose client stats, seconds or totals are not numbers (a rank not an integer)
    ends the command with exit 2 and the line, not with a traceback from the plots."""
    copy = copy_of(run_dir, tmp_path, "metrics.jsonl", "results.json")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    edit(record)
    lines[1] = json.dumps(record)
    (copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "line 2: not a tapdist round record" in err and field in err


@pytest.mark.parametrize("how", ["read-only folder", "report is a file"])
def test_a_folder_the_report_cannot_be_written_to_gets_a_clear_message(
    run_dir, tmp_path, capsys, how
):
    copy = copy_of(run_dir, tmp_path, "metrics.jsonl", "results.json")
    if how == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        copy.chmod(0o555)
    else:
        (copy / "report").write_text("")  # the plots' folder cannot be made
    try:
        assert main(["report", str(copy)]) == 2
    finally:
        copy.chmod(0o755)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"cannot write the report to {copy}" in err and "writable" in err
    assert not (copy / "report.md").exists()


def test_results_that_are_not_tapdist_results_are_refused(run_dir, tmp_path):
    copy = copy_of(run_dir, tmp_path, "metrics.jsonl")
    (copy / "results.json").write_text(json.dumps({"tap": {"0": {"objects": {"acc": 1}}}}))
    with pytest.raises(ReportError, match="results.json is not a tapdist results file"):
        write_report(copy)


def test_phases_of_the_busiest_rank_and_the_aggregation_make_the_round():
    record = {
        "clients": {
            "0": {"rank": 0, "global_s": 0.5, "personal_s": 0.25, "train_s": 1.0},
            "3": {"rank": 1, "global_s": 1.0, "personal_s": 0.5, "train_s": 2.0},
            "4": {"rank": 1, "global_s": 0.25, "personal_s": 0.125, "train_s": 0.5},
        },
        "seconds": {"train_max_rank": 2.5, "round": 3.0},
    }
    phases = phase_seconds(record)
    assert phases == {
        "global_s": 1.25,
        "personal_s": 0.625,
        "other client work": 0.625,
        "aggregation": 0.5,
    }
    assert sum(phases.values()) == record["seconds"]["round"]


# --- tapdist bench ------------------------------------------------------------------------------


@pytest.fixture
def bench_folder(tmp_path, monkeypatch):
    """A benchmarks folder: a script, a module without a __main__ block (not a benchmark), and a
    helper the script imports."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "helper.py").write_text('"""Shared by the scripts."""\nGREETING = "hello"\n')
    (folder / "tiny.py").write_text(
        textwrap.dedent(
            '''
            """Tiny benchmark: writes its arguments."""
            import sys
            from pathlib import Path

            from benchmarks.helper import GREETING

            if __name__ == "__main__":
                out, *rest = sys.argv[1:]
                Path(out).write_text(f"{GREETING} {Path(sys.argv[0]).name} {rest}")
                if "--fail" in rest:
                    sys.exit(3)
            '''
        )
    )
    (folder / "by_main.py").write_text('"""Main only."""\n\n\ndef main(argv):\n    return 0\n')
    (tmp_path / "pyproject.toml").write_text("")  # a source checkout
    monkeypatch.setattr(tapdist.cli, "BENCHMARKS", folder)
    return folder


def test_bench_runs_a_script_as_python_m_would(bench_folder, tmp_path):
    out = tmp_path / "out.txt"
    assert run_benchmark("tiny", [str(out), "--x", "1"], bench_folder) == 0
    assert out.read_text() == "hello tiny.py ['--x', '1']"
    assert run_benchmark("tiny", [str(out), "--fail"], bench_folder) == 3


def test_bench_keeps_the_callers_working_directory(bench_folder, tmp_path, monkeypatch):
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    assert run_benchmark("tiny", ["out.txt"], bench_folder) == 0  # a relative path: from here
    assert (here / "out.txt").read_text() == "hello tiny.py []"
    with pytest.raises(CommandError, match="no benchmark 'by_main'"):
        run_benchmark("by_main", [], bench_folder)


def test_bench_lists_benchmarks_and_refuses_unknown_names(bench_folder, tmp_path, capsys):
    assert main(["bench"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"\n  tiny +Tiny benchmark: writes its", listed)
    assert "helper" not in listed and "by_main" not in listed
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'nope'" in err and "available: tiny" in err
    out = tmp_path / "cli.txt"
    assert main(["bench", "tiny", str(out), "--flag"]) == 0
    assert out.read_text() == "hello tiny.py ['--flag']"
    with pytest.raises(CommandError, match="no benchmarks folder.*source checkout"):
        run_benchmark("tiny", [], tmp_path / "missing")
    (tmp_path / "pyproject.toml").unlink()  # benchmarks, but not beside a checkout
    assert main(["bench"]) == 2
    assert "runs the scripts of a source checkout" in capsys.readouterr().err
