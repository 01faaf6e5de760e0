"""Rank-aware logging, per-rank log files, progress lines and TensorBoard scalars."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
from conftest import SMOKE_CONFIG

from tapdist.cli import main
from tapdist.config import ConfigError
from tapdist.logs import Progress, rank_log_file, require_tensorboard, round_scalars, setup_logging

log = logging.getLogger("tapdist.test")


@pytest.fixture(autouse=True)
def quiet_logger():
    """Each test configures the tapdist logger itself; leave it closed and empty after."""
    yield
    root = logging.getLogger("tapdist")
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = []


def test_a_non_server_rank_writes_every_record_to_its_file_but_only_warnings_to_stderr(
    tmp_path, capsys
):
    path = rank_log_file(tmp_path, 3)
    assert path == tmp_path / "logs" / "rank-0003.log"
    setup_logging(3, 4, "info", is_server=False, log_file=path)
    log.info("client 7 trained")
    log.debug("not at info level")
    log.warning("slow all_reduce")
    err = capsys.readouterr().err
    assert "slow all_reduce" in err and "client 7" not in err
    assert "[tapdist r3 " in err
    text = path.read_text()
    assert "INFO client 7 trained" in text and "WARNING slow all_reduce" in text
    assert "not at info level" not in text
    assert "rank 3 of 4" in text  # the header of this job's part of the file


def test_the_server_logs_at_its_level_and_the_file_is_appended_to_across_jobs(tmp_path, capsys):
    path = rank_log_file(tmp_path, 0)
    setup_logging(0, 2, "debug", log_file=path)
    log.debug("first job")
    setup_logging(0, 2, "info", log_file=path)  # a resumed job appends
    log.info("second job")
    assert "first job" in capsys.readouterr().err
    text = path.read_text()
    assert text.index("first job") < text.index("second job")
    assert text.count("logs to") == 2


def test_without_a_file_nothing_is_written(tmp_path):
    setup_logging(0, 1, "info")
    log.info("only on stderr")
    assert not (tmp_path / "logs").exists()


def test_progress_steps_are_log_lines_and_slow_steps_get_notes(tmp_path, capsys):
    path = rank_log_file(tmp_path, 1)
    setup_logging(1, 2, "info", is_server=False, log_file=path)
    with Progress("tap rounds", 2, bar=False, quiet_s=3600) as bar:
        bar.note("client 3 trained")  # within quiet_s of the start: debug level
        bar.step("round 1")
    with Progress("tap post-FL stage", 1, bar=False, quiet_s=0) as bar:
        bar.note("client 4: evaluating")  # a slow step: always a line
        bar.step("client 4")
    text = path.read_text()
    assert "tap rounds 1/2" in text and "round 1" in text
    assert "client 3 trained" not in text
    assert "tap post-FL stage 0/1" in text and "client 4: evaluating" in text
    assert "tap rounds" not in capsys.readouterr().err  # a non-server rank's console


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_server_draws_a_bar_and_records_replace_it(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    path = rank_log_file(tmp_path, 0)
    setup_logging(0, 1, "info", log_file=path)
    with Progress("tap rounds", 2) as bar:
        bar.step("round 1")
        log.info("checkpoint written")
        bar.step("round 2")
    screen = terminal.getvalue()
    assert "tap rounds [############............] 1/2" in screen
    assert "\r\x1b[K[tapdist r0 " in screen and "checkpoint written" in screen
    assert "tap rounds 1/2" not in screen  # the step lines are the bar here...
    assert re.search(r"\] 2/2 \d+s round 2$", screen.rstrip())  # ...drawn last again, whole
    assert "tap rounds 2/2" in path.read_text()  # ...and lines in the log file


RECORD = {
    "algorithm": "tap",
    "round": 4,
    "sampled": [0, 3],
    "clients": {
        "0": {
            "rank": 0,
            "samples": 32,
            "global_loss.objects": 2.0,
            "personal_loss.objects": 1.5,
            "replaced.objects": 1.0,
            "global_s": 0.5,
            "train_s": 0.7,
        },
        "3": {
            "rank": 1,
            "samples": 16,
            "global_loss.news": 1.0,
            "personal_loss.news": 1.5,
            "replaced.news": 0.0,
            "global_s": 0.25,
            "train_s": 0.3,
        },
    },
    "replacements": {"image_cls": 1, "text_cls": 0},
    "replacements_cumulative": {"image_cls": 3, "text_cls": 2},
    "tensors_updated": 285,
    "bytes_sent_per_rank": 906000,
    "seconds": {"train_max_rank": 0.7, "aggregate": 0.01, "round": 0.72},
}


def test_round_scalars_name_every_number_of_a_record():
    scalars = round_scalars(RECORD)
    assert scalars["global_loss/client_0/objects"] == 2.0
    assert scalars["personal_loss/client_3/news"] == 1.5
    assert scalars["replaced/client_0/objects"] == 1.0
    assert scalars["global_loss/mean"] == 1.5 and scalars["personal_loss/mean"] == 1.5
    assert "replaced/mean" not in scalars  # only losses are averaged
    assert scalars["client_seconds/client_3/global_s"] == 0.25
    assert scalars["client_seconds/client_0/train_s"] == 0.7
    assert scalars["replacements/image_cls"] == 1 and scalars["replacements_cumulative/text_cls"]
    assert scalars["seconds/round"] == 0.72
    assert scalars["round/bytes_sent_per_rank"] == 906000
    assert scalars["round/tensors_updated"] == 285
    assert not any(t.endswith(("/rank", "/samples")) for t in scalars)


def _train(run_dir, *settings, resume=False):
    args = ["train", str(SMOKE_CONFIG), "--set", "federation.rounds=2"]
    args += [a for s in settings for a in ("--set", s)]
    args += ["--resume" if resume else "--run-dir", str(run_dir)]
    return main(args)


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def test_a_run_split_over_two_jobs_writes_one_log_and_one_set_of_scalars(tmp_path):
    run_dir = tmp_path / "run"
    settings = ("run.tensorboard=true", "run.log_files=true", "run.rounds_per_job=1")
    assert _train(run_dir, *settings) == 0
    assert _train(run_dir, *settings, resume=True) == 0
    text = rank_log_file(run_dir, 0).read_text()
    assert text.count("logs to") == 2  # both jobs, appended
    assert "stopped by run.rounds_per_job" in text and "resuming from" in text
    assert "tap rounds 2/2 " in text  # the second job's round counts as the run's second
    assert "tap post-FL stage and evaluation 5/5" in text
    events = _scalars(run_dir / "tensorboard" / "tap")
    tags = set(events.Tags()["scalars"])
    expected = {
        "global_loss/client_0/objects",
        "personal_loss/client_4/law_qa",
        "global_loss/mean",
        "personal_loss/mean",
        "replacements/text_gen",
        "replacements_cumulative/image_cls",
        "client_seconds/client_0/personal_s",
        "seconds/round",
        "seconds/aggregate",
        "round/bytes_sent_per_rank",
        "round/tensors_updated",
    }
    assert expected <= tags, sorted(expected - tags)
    assert [e.step for e in events.Scalars("seconds/round")] == [1, 2]  # one value per round


def test_tensorboard_requested_but_missing_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'tapdist\[tensorboard\]'"):
        require_tensorboard()
    assert _train(tmp_path / "run", "run.tensorboard=true") == 2
    err = capsys.readouterr().err
    assert "config error: run.tensorboard is true" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
