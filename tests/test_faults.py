"""A rank that dies or hangs mid-run ends the job within ``dist.timeout_s`` under mpiexec (gloo
and MPI transports) and srun, with a message naming the missing rank and the phase, instead of
a job that waits forever. ``TAPDIST_FAULT`` (tapdist/dist/faults.py) makes the rank fail."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, SMOKE_CONFIG, start_slurm_cluster, unavailable, venv_tool

from tapdist.dist.context import Arrivals
from tapdist.dist.faults import parse_fault

TIMEOUT_S = 10  # dist.timeout_s of the faulty runs
# After the timeout: the store's linger (3 s), srun's KillWait for a rank that ignores SIGTERM
# (5 s on the local cluster), and slack for a loaded machine.
MARGIN_S = 20
LIMIT_S = 300  # a job still running after this hangs: the test fails
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
TRAIN = ["-m", "tapdist", "train", str(SMOKE_CONFIG), "--set", f"dist.timeout_s={TIMEOUT_S}"]


# --- the pieces, without processes ------------------------------------------------------------


def test_fault_values():
    assert parse_fault("") is None
    assert parse_fault("2:0:hang") == (2, 0, "hang")
    assert parse_fault("1:7:die") == (1, 7, "die")
    for bad in ("1:2", "a:1:die", "1:2:explode", "1:2:die:now"):
        with pytest.raises(ValueError, match="TAPDIST_FAULT.*RANK:ROUND:ACTION"):
            parse_fault(bad)


def test_arrivals_name_the_ranks_behind():
    from torch.distributed import HashStore

    store = HashStore()
    ranks = [Arrivals(store, r, 3, "served by rank 0 at h:1", r == 0) for r in range(3)]
    for arrivals in ranks[:2]:
        arrivals.arrive("initial state broadcast")
    assert ranks[0].absent() == "rank 2 (in no collective yet)"
    ranks[2].arrive("initial state broadcast")
    assert ranks[0].absent() == ""
    ranks[0].arrive("round 0 aggregation all_reduce")
    ranks[2].arrive("round 0 aggregation all_reduce")
    assert ranks[0].absent() == "rank 1 (last in 'initial state broadcast')"
    assert ranks[1].absent() == (
        "rank 0 (last in 'round 0 aggregation all_reduce'), "
        "rank 2 (last in 'round 0 aggregation all_reduce')"
    )


def test_arrivals_without_their_store_say_so():
    class Gone:
        def set(self, key, value):
            raise RuntimeError("Connection reset by peer")

        set_timeout = check = get = set

    arrivals = Arrivals(Gone(), 1, 2, "served by rank 0 at h:1", False)
    arrivals.arrive("round 3 stop check")  # does not raise: the collective will
    assert arrivals.absent() == (
        "unknown: the rendezvous store (served by rank 0 at h:1) does not answer"
    )


def test_the_store_host_lingers_only_after_a_failure_of_a_real_job(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    Arrivals(None, 1, 3, "h", served_here=False).linger()
    Arrivals(None, 0, 1, "h", served_here=True).linger()
    assert slept == []
    Arrivals(None, 0, 3, "h", served_here=True).linger()
    assert slept == [Arrivals.LINGER_S]


# --- whole jobs under launchers ---------------------------------------------------------------


def mpiexec(backend: str) -> list[str]:
    tool = venv_tool("mpiexec")
    if tool is None:
        unavailable("mpiexec not found: pip install 'tapdist[mpi-wheel]'")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        unavailable("mpi4py not installed: pip install 'tapdist[mpi-wheel]'")
    return [tool, "-n", "3", sys.executable, *TRAIN, "--set", f"dist.backend={backend}"]


def srun(backend: str) -> list[str]:
    start_slurm_cluster()
    tool = venv_tool("srun")
    # as slurm/tapdist.sbatch launches: a task that fails ends the step
    flags = ["-n", "3", "--overcommit", "--kill-on-bad-exit=1", "--time=10"]
    return [tool, *flags, sys.executable, *TRAIN, "--set", f"dist.backend={backend}"]


class Outcome:
    """A finished job: exit code, its output (stdout and stderr), and the seconds from the
    injected fault to the job's end."""

    def __init__(self, code: int, output: str, after_fault: float):
        self.code, self.output, self.after_fault = code, output, after_fault


def run_with_fault(cmd: list[str], fault: str, run_dir) -> Outcome:
    proc = subprocess.Popen(
        [*cmd, "--run-dir", str(run_dir)],
        env=dict(ENV, TAPDIST_FAULT=fault),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job still ran {LIMIT_S}s after it started:\n{_text(lines)}")
    ended = time.monotonic()
    reader.join(timeout=10)
    output = _text(lines)
    fault_at = [t for t, line in lines if "TAPDIST_FAULT:" in line]
    assert fault_at, f"the fault never happened:\n{output}"
    return Outcome(proc.returncode, output, ended - fault_at[0])


def _text(lines: list[tuple[float, str]]) -> str:
    return "".join(line for _, line in lines)


FAULTS = [
    # launcher, backend, fault (rank:round:action)
    ("mpiexec", "gloo", "2:0:hang"),
    ("mpiexec", "gloo", "1:1:die"),
    ("mpiexec", "mpi", "2:0:hang"),
    ("mpiexec", "mpi", "1:1:die"),
    ("srun", "gloo", "2:0:hang"),
    ("srun", "gloo", "1:1:die"),
]


@pytest.mark.integration
@pytest.mark.parametrize("launcher, backend, fault", FAULTS)
def test_a_dead_or_hung_rank_ends_the_job_and_is_named(tmp_path, launcher, backend, fault):
    cmd = (mpiexec if launcher == "mpiexec" else srun)(backend)
    rank, round_index, action = parse_fault(fault)
    started = time.monotonic()
    out = run_with_fault(cmd, fault, tmp_path / "run")
    print(
        f"{launcher} {backend} {fault}: {time.monotonic() - started:.1f}s in all, "
        f"{out.after_fault:.1f}s after the fault"
    )
    assert out.code != 0, out.output
    assert out.after_fault < TIMEOUT_S + MARGIN_S, out.output
    assert not (tmp_path / "run" / "results.json").exists()
    # the ranks still waiting name the phase, and the missing rank with where it was last
    phase = rf"round {round_index} stop check failed after [\d.]+s"
    missing = rf"Not in this collective: rank {rank} \(last in 'round {round_index} aggregation"
    errors = [
        line for line in out.output.splitlines() if re.match(r"tapdist \(rank \d\): error", line)
    ]
    assert all(re.search(phase, line) for line in errors), out.output
    if launcher == "mpiexec" and action == "die":
        # mpiexec ends every rank as soon as one is killed, often before the others notice,
        # and names the killed process itself
        assert "BAD TERMINATION" in out.output and "EXIT CODE: 9" in out.output, out.output
        return
    assert any(re.search(missing, line) for line in errors), out.output
    if launcher == "srun":  # srun names the task it had to kill (or that was killed)
        assert f"task {rank}: Killed" in out.output, out.output
    if action == "hang":
        assert f"failed after {TIMEOUT_S}." in out.output  # it waited dist.timeout_s, no more
