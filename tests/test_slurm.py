"""The sbatch templates in slurm/ on a real single-node Slurm cluster (slurm/local_cluster.sh).

Each template runs the smoke federation on the CPU (gloo) and must write the results of one
process; a job sent the templates' stop signal mid-run must stop with a checkpoint and exit
code 0; resubmitting it with --resume, or requeuing it, must end as an uninterrupted run. With a
stand-in for python that records each rank's environment: a job submitted with a limited
--export still hands the ranks the batch script's environment, and the sizes on the sbatch
command line hold (or the job warns where --ntasks caps --ntasks-per-node).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE_CONFIG, assert_same_results, venv_tool

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("slurm_cluster")]

SLURM = ROOT / "slurm"
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    HF_HUB_OFFLINE="1",
    PYTHONUNBUFFERED="1",
    PYTHON=sys.executable,  # the templates start `$PYTHON -m tapdist`
)
# This node has no GPUs and few cores: one core per rank, and more ranks than cores.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--overcommit", "--time=15"]
# The multi-node templates on one node. Slurm refuses more tasks per node than the node has
# CPUs (2 on CI) even with --overcommit, so they get 2 ranks; one_node sizes by --ntasks.
SHAPES = {
    "one_node": ["--ntasks=3"],
    "multi_node": ["--nodes=1", "--ntasks-per-node=2"],
    "multi_node_torchrun": ["--nodes=1", "--ntasks-per-node=2"],
}
# Rounds long enough (a second or more each) for a signal sent after round 0 to land mid-run.
LONGER = ("federation.rounds=5", "train.local_steps=4")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}  # fmt: skip


def overrides(settings: tuple[str, ...]) -> list[str]:
    return [arg for item in settings for arg in ("--set", item)]


@dataclass
class Job:
    """A submitted batch job, watched with `scontrol show job` (a 0.5 s poll; `sbatch --wait`
    polls at growing intervals and would add up to half a minute per job)."""

    id: str
    log: Path

    def info(self) -> dict[str, str]:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", self.id],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no job output)"

    def wait(self, restarts: int = 0, timeout: float = 600) -> dict[str, str]:
        """The job's record once it has ended after ``restarts`` requeues."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in ENDED and int(info.get("Restarts", 0)) >= restarts:
                return info
            time.sleep(0.5)
        self.cancel()
        pytest.fail(f"job {self.id} still running after {timeout:.0f}s:\n{self.output()}")

    def wait_for_round(self, metrics: Path, timeout: float = 300) -> None:
        """Until the server has logged round 0 in ``metrics``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().strip():
                return
            if self.info().get("JobState") in ENDED:
                pytest.fail(f"job {self.id} ended before its first round:\n{self.output()}")
            time.sleep(0.1)
        self.cancel()
        pytest.fail(f"job {self.id} finished no round in {timeout:.0f}s:\n{self.output()}")

    def signal(self, name: str) -> None:
        """Send signal ``name`` to every process of the job's steps, as `--signal` does
        before the time limit (the batch shell itself is not signalled)."""
        subprocess.run(["scancel", f"--signal={name}", self.id], check=True, timeout=30)

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=30)

    def assert_completed(self, info: dict[str, str]) -> str:
        output = self.output()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), output
        return output


def sbatch(template: str, flags: list[str], config: Path, *train_args, log: Path) -> Job:
    """Submit ``slurm/TEMPLATE.sbatch CONFIG TRAIN_ARGS`` with sbatch ``flags``, its output to
    ``log`` (from the folder of ``log``, where a run without --run-dir would land)."""
    cmd = [
        venv_tool("sbatch") or "sbatch",
        "--parsable",
        *flags,
        f"--output={log}",
        str(SLURM / f"{template}.sbatch"),
        str(config),
        *map(str, train_args),
    ]
    done = subprocess.run(cmd, env=ENV, cwd=log.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"sbatch failed:\n{done.stdout}\n{done.stderr}"
    return Job(done.stdout.strip().split(";")[0], log)


@pytest.fixture
def submit(tmp_path):
    """``submit(template, *train_args, name=...)``: sbatch a template with the smoke config on
    this node's CPU; jobs still running at the end of the test are cancelled."""
    jobs: list[Job] = []

    def submit(template: str, *train_args, name: str = "job") -> Job:
        flags = [*CPU_JOB, *SHAPES[template]]
        jobs.append(
            sbatch(template, flags, SMOKE_CONFIG, *train_args, log=tmp_path / f"{name}.out")
        )
        return jobs[-1]

    yield submit
    for job in jobs:
        if job.info().get("JobState") not in ENDED:
            job.cancel()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """``single(*settings)``: the run folder of the smoke config with ``settings`` as one
    process (each computed once)."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(*settings: str) -> Path:
        if settings not in runs:
            run_dir = tmp_path_factory.mktemp("single") / "run"
            cmd = [sys.executable, "-m", "tapdist", "train", str(SMOKE_CONFIG)]
            cmd += [*overrides(settings), "--run-dir", str(run_dir)]
            done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            runs[settings] = run_dir
        return runs[settings]

    return run


def metrics_rounds(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines]


def stop_mid_run(job: Job, signal: str, run_dir: Path) -> Path:
    """Send ``signal`` to ``job``'s steps once a round is done; the job must end cleanly after
    a checkpoint, which is returned."""
    job.wait_for_round(run_dir / "metrics.jsonl")
    job.signal(signal)
    output = job.assert_completed(job.wait())
    assert "stopped by a stop signal" in output
    return stopped_checkpoint(run_dir)


def stopped_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run that stopped early."""
    assert not (run_dir / "results.json").exists(), "the run finished before the signal"
    complete = sorted(p.parent for p in (run_dir / "checkpoints").glob("*/MANIFEST.json"))
    assert complete, f"no complete checkpoint in {run_dir / 'checkpoints'}"
    return complete[-1]


@pytest.mark.parametrize("template", list(SHAPES))
def test_template_runs_the_federation_of_one_process(template, submit, single, tmp_path):
    job = submit(template, "--run-dir", tmp_path / "run")
    output = job.assert_completed(job.wait())
    ranks = 3 if template == "one_node" else 2
    launcher = "torchrun" if template.endswith("torchrun") else "slurm"
    assert f"on {ranks} ranks ({launcher}, gloo on cpu)" in output
    assert "done in" in output
    assert_same_results(tmp_path / "run", single())


def test_sigterm_stops_the_job_cleanly_and_resume_finishes_it(submit, single, tmp_path):
    """SIGTERM to the steps (what --signal=TERM@120 sends before the time limit): every rank
    stops after the round with a checkpoint, the job completes with exit code 0, and the
    same template resubmitted with --resume ends as an uninterrupted run."""
    run_dir = tmp_path / "run"
    job = submit("one_node", "--run-dir", run_dir, *overrides(LONGER))
    checkpoint = stop_mid_run(job, "TERM", run_dir)

    again = submit("one_node", "--resume", run_dir, *overrides(LONGER), name="resumed")
    output = again.assert_completed(again.wait())
    assert f"resuming from {checkpoint}" in output
    assert_same_results(run_dir, single(*LONGER))
    assert metrics_rounds(run_dir) == list(range(5))


def test_a_requeued_job_resumes_by_itself(submit, single, tmp_path):
    """The torchrun template's stop signal (SIGUSR1, which torchrun ignores and its ranks
    take) ends the job cleanly; `scontrol requeue` starts the same job again
    (SLURM_RESTART_COUNT=1), which goes on from the newest checkpoint by itself."""
    run_dir = tmp_path / "run"
    job = submit("multi_node_torchrun", "--run-dir", run_dir, *overrides(LONGER))
    checkpoint = stop_mid_run(job, "USR1", run_dir)

    subprocess.run(["scontrol", "requeue", job.id], check=True, timeout=30)
    # Slurm holds a requeued job back for a while (Reason=BeginTime): release it in 3 s. Not at
    # once: a run whose job credential dates from the second the last run ended in is refused
    # as revoked (slurmctld.log: "Killing non-startable batch job: Job credential revoked").
    release = ["scontrol", "update", f"JobId={job.id}", "StartTime=now+3"]
    subprocess.run(release, check=True, timeout=30)
    output = job.assert_completed(job.wait(restarts=1))
    assert "(restart 1)" in output and f"resuming from {checkpoint}" in output
    assert_same_results(run_dir, single(*LONGER))
    assert metrics_rounds(run_dir) == list(range(5))


def env_recorder(folder: Path) -> Path:
    """A stand-in for python (the templates' PYTHON): every task that runs it writes its
    environment to ``folder``/env-RANK."""
    script = folder / "python"
    script.write_text(f'#!/bin/bash\nenv -0 >"{folder}/env-$SLURM_PROCID"\n')
    script.chmod(0o755)
    return script


def recorded_envs(folder: Path) -> list[dict[str, str]]:
    envs = [path.read_text().split("\0") for path in sorted(folder.glob("env-*"))]
    return [dict(item.split("=", 1) for item in env if "=" in item) for env in envs]


# One job of each template on this node (tapdist.sbatch sets no task count of its own).
SIZES = {"tapdist": ["--ntasks=2"], **SHAPES}


@pytest.mark.parametrize("template", list(SIZES))
def test_steps_get_the_batch_environment_where_sbatch_exports_little(
    template, tmp_path, monkeypatch
):
    """`sbatch --export=PYTHON=...` (or a site's --export=NONE) leaves the batch script only the
    named variables, and srun would pass its steps no more; the templates export
    SLURM_EXPORT_ENV=ALL, so the ranks see what the script set (OMP_NUM_THREADS, MASTER_ADDR)."""
    python = env_recorder(tmp_path)
    flags = [*CPU_JOB, *SIZES[template], f"--export=PYTHON={python}"]
    monkeypatch.setitem(ENV, "TAPDIST_SUBMITTER_ONLY", "1")  # what the export leaves behind
    job = sbatch(template, flags, SMOKE_CONFIG, log=tmp_path / "job.out")
    info = job.wait(timeout=120)
    job.assert_completed(info)
    envs = recorded_envs(tmp_path)
    tasks = 1 if template.endswith("torchrun") else int(info["NumTasks"])
    assert len(envs) == tasks, job.output()
    for env in envs:
        assert "TAPDIST_SUBMITTER_ONLY" not in env
        assert (env["SLURM_EXPORT_ENV"], env["PYTHON"]) == ("ALL", str(python))
        assert (env["MASTER_ADDR"], env["OMP_NUM_THREADS"]) == (info["NodeList"], "1")


@pytest.mark.parametrize(
    "sizing, tasks",
    [
        (["--nodes=1", "--ntasks-per-node=1"], 1),  # no --ntasks in the template to fight it
        (["--nodes=1", "--ntasks-per-node=2", "--ntasks=1"], 1),  # --ntasks caps it: a warning
    ],
)
def test_tapdist_template_takes_its_size_from_the_command_line(sizing, tasks, tmp_path):
    python = env_recorder(tmp_path)
    flags = [*CPU_JOB, *sizing, f"--export=ALL,PYTHON={python}"]
    job = sbatch("tapdist", flags, SMOKE_CONFIG, log=tmp_path / "job.out")
    output = job.assert_completed(job.wait(timeout=120))
    assert len(recorded_envs(tmp_path)) == tasks, output
    warned = "WARNING: 1 tasks, not the 1 node(s) x 2 tasks per node asked for" in output
    assert warned == ("--ntasks=1" in sizing), output
