import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOKE_CONFIG

from tapdist.dist import LaunchError, detect_launch, resolve_backend, resolve_device
from tapdist.dist.launch import Launch, _expand_counts, slurm_port

TORCHRUN = {
    "RANK": "2",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node1",
    "MASTER_PORT": "29511",
}
SRUN = {
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "3",
    "SLURM_STEP_NUM_TASKS": "3",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NODELIST": "vm",
    "SLURM_NODEID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "3",
}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3"}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
}


def test_torchrun():
    assert detect_launch(env=TORCHRUN) == Launch("torchrun", 2, 4, 0, 2, "node1", 29511)


def test_torchrun_without_master_is_an_error():
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        detect_launch(env={"RANK": "0", "WORLD_SIZE": "2"})


def test_srun_step():
    launch = detect_launch(env=SRUN)
    assert launch == Launch("slurm", 1, 3, 1, 3, "vm", slurm_port(SRUN))
    assert launch.master_port == 20000 + 1234 * 97 % 12768
    other_step = detect_launch(env=dict(SRUN, SLURM_STEP_ID="1"))
    assert other_step.master_port != launch.master_port


def test_derived_ports_stay_below_the_ephemeral_range():
    # Linux picks the local port of outgoing connections from 32768 up (ip_local_port_range),
    # so a derived port there may already be taken; 20000 + 1234 * 97 % 20000 was 39698.
    ports = {
        slurm_port(dict(SLURM_JOB_ID=str(job), SLURM_STEP_ID=str(step)))
        for job in range(0, 300000, 997)
        for step in range(3)
    }
    assert min(ports) >= 20000 and max(ports) < 32768
    assert len(ports) > 500  # still spread out


def test_srun_takes_an_exported_master_addr_without_scontrol(monkeypatch):
    def no_scontrol(cmd, **kwargs):  # a container in the step without Slurm's tools
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr("tapdist.dist.launch.subprocess.run", no_scontrol)
    env = dict(SRUN, SLURM_JOB_NODELIST="gpu[005-008]", SLURM_STEP_NODELIST="gpu[005-008]")
    with pytest.raises(LaunchError, match="export MASTER_ADDR"):
        detect_launch(env=env)
    assert detect_launch(env=dict(env, MASTER_ADDR="gpu005")).master_addr == "gpu005"


def test_srun_master_is_first_host_of_nodelist(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)

        class Out:
            stdout = "gpu007\ngpu008\n"

        return Out()

    monkeypatch.setattr("tapdist.dist.launch.subprocess.run", fake_run)
    env = dict(
        SRUN,
        SLURM_JOB_NODELIST="gpu[005-008]",
        SLURM_STEP_NODELIST="gpu[007-008]",
        SLURM_NODEID="1",
        SLURM_PROCID="2",
        SLURM_LOCALID="0",
        SLURM_STEP_TASKS_PER_NODE="2,1",
    )
    launch = detect_launch(env=env)
    assert calls == [["scontrol", "show", "hostnames", "gpu[007-008]"]]
    assert (launch.master_addr, launch.local_world_size) == ("gpu007", 1)


def test_sbatch_script_without_srun_is_one_process():
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert detect_launch(env=batch).launcher == "single"
    assert detect_launch(env=dict(SRUN, SLURM_STEP_ID="batch")).launcher == "single"


def test_mpich_and_openmpi():
    assert detect_launch(env=MPICH) == Launch("mpi", 2, 3, 2, 3)
    assert detect_launch(env=OPENMPI) == Launch("mpi", 5, 8, 1, 4)


def test_srun_with_pmi_prefers_slurm_when_they_agree():
    env = dict(SRUN, PMI_RANK="1", PMI_SIZE="3")
    assert detect_launch(env=env).launcher == "slurm"


def test_mpirun_inside_an_allocation_prefers_mpi():
    # hydra's proxies run as a one-task srun step; the ranks are in PMI_*
    env = dict(SRUN, SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1", **MPICH)
    assert detect_launch(env=env).launcher == "mpi"


def test_missing_local_ranks_come_from_srun_else_from_one_node():
    # srun --mpi=pmi2 sets PMI_RANK and PMI_SIZE but no MPI local rank
    pmi = dict(SRUN, PMI_RANK="1", PMI_SIZE="3")
    assert detect_launch("mpi", env=pmi) == Launch("mpi", 1, 3, 1, 3)
    # RANK, WORLD_SIZE and MASTER_* exported by hand: every rank on this node
    by_hand = {k: v for k, v in TORCHRUN.items() if not k.startswith("LOCAL_")}
    assert detect_launch(env=by_hand) == Launch("torchrun", 2, 4, 2, 4, "node1", 29511)


def test_srun_tasks_sharing_a_gpu_are_not_each_given_it():
    from tapdist.dist import DeviceError, device_for

    shared = detect_launch(env=dict(SRUN, SLURM_STEP_GPUS="0"))  # srun -n3 --gpus-per-node=1
    assert (shared.node_gpus, shared.local_world_size) == (1, 3)
    with pytest.raises(DeviceError, match="3 ranks on this node but only 1 GPU"):
        device_for(shared, 1, "cuda")
    assert device_for(shared, 1, "auto") == torch.device("cpu")
    for bound in (  # each task bound to its own GPU, which may be all its lists show
        dict(SRUN, SLURM_STEP_GPUS="0,1,2"),
        dict(SRUN, SLURM_STEP_GPUS="2", SLURM_JOB_GPUS="0,1,2"),
        dict(SRUN, SLURM_STEP_GPUS="2", SLURM_GPUS_PER_TASK="1"),
        SRUN,  # no GPU lists: as before, each task has its own
    ):
        assert device_for(detect_launch(env=bound), 1, "cuda") == torch.device("cuda", 0)


def test_the_mpi_backend_without_mpi4py_says_what_to_install(monkeypatch):
    from tapdist.dist.context import MpiContext

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    with pytest.raises(LaunchError, match=r"dist.backend = mpi needs mpi4py: pip install"):
        MpiContext(Launch("mpi", 0, 2, 0, 2), torch.device("cpu"), 10)


def test_single_and_forced_launchers():
    assert detect_launch(env={}) == Launch("single", 0, 1, 0, 1)
    assert detect_launch("single", env=TORCHRUN).launcher == "single"
    with pytest.raises(LaunchError, match="dist.launcher = slurm.*SLURM_PROCID"):
        detect_launch("slurm", env=TORCHRUN)


def test_inconsistent_environment_is_reported():
    with pytest.raises(LaunchError, match="not an integer"):
        detect_launch(env=dict(MPICH, PMI_RANK="two"))
    with pytest.raises(LaunchError, match="rank 3 is outside world size 3"):
        detect_launch(env=dict(MPICH, PMI_RANK="3"))


def test_tasks_per_node_expansion():
    assert _expand_counts("2(x3),1") == [2, 2, 2, 1]
    assert _expand_counts("4") == [4]


def test_device_and_backend_choice():
    one = Launch("single", 0, 1, 0, 1)
    assert resolve_device("cpu", one).type == "cpu"
    assert resolve_backend("auto", resolve_device("cpu", one)) == "gloo"
    from tapdist.dist import DistError

    with pytest.raises(DistError, match="nccl needs CUDA"):
        resolve_backend("nccl", resolve_device("cpu", one))


def test_more_local_ranks_than_gpus_fails(monkeypatch):
    from tapdist.dist import DistError

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    launch = Launch("torchrun", 3, 4, 3, 4, "h", 1)
    with pytest.raises(DistError, match="4 ranks on this node but only 2 GPU"):
        resolve_device("cuda", launch)
    assert resolve_device("auto", Launch("torchrun", 1, 2, 1, 2, "h", 1)).index == 1
    assert resolve_device("auto", launch).type == "cpu"  # auto falls back, with a warning
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    bound = Launch("slurm", 3, 4, 3, 4, "h", 1)  # srun --gpus-per-task=1: one GPU per task
    assert resolve_device("cuda", bound) == torch.device("cuda", 0)


def test_mpirun_without_mpi4py_says_what_to_install(monkeypatch):
    from tapdist.config import DistConfig
    from tapdist.dist import init_context

    def missing(launch):
        raise ImportError("No module named 'mpi4py'")

    monkeypatch.setattr("tapdist.dist.mpi_rendezvous_address", missing)
    with pytest.raises(LaunchError, match=r"pip install 'tapdist\[mpi\]'.*MASTER_ADDR"):
        init_context(DistConfig(device="cpu"), Launch("mpi", 0, 2, 0, 2))


# The launch scripts and sbatch templates, run with stand-ins for srun, scontrol and python.

SLURM = ROOT / "slurm"
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
# What Slurm tells the batch script of `sbatch --nodes=2 --ntasks-per-node=4`.
BATCH = {
    "SLURM_JOB_ID": "15000",
    "SLURM_JOB_NODELIST": "gpu[00001-00002]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_CPUS_PER_TASK": "1",
    "SLURM_CPUS_ON_NODE": "4",
}
RECORD = 'printf "%s\\0" "$@" >"{out}/{name}.args"; env -0 >"{out}/{name}.env"\n'


def stand_ins(folder: Path, hosts: int = 2) -> Path:
    """A bin folder with srun, python and scontrol that record their arguments and environment
    in ``folder``; `scontrol show hostnames` answers with ``hosts`` names, gpu00001 first."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    expand = f'[[ "$1 $2" != "show hostnames" ]] || seq -f "gpu%05g" 1 {hosts}\n'
    for name, then in (("srun", ""), ("python", ""), ("scontrol", expand)):
        (bin_dir / name).write_text("#!/bin/bash\n" + RECORD.format(out=folder, name=name) + then)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def recorded(folder: Path, name: str) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment a stand-in was last called with."""
    args = (folder / f"{name}.args").read_text().split("\0")[:-1]
    env = (folder / f"{name}.env").read_text().split("\0")
    return args, dict(item.split("=", 1) for item in env if "=" in item)


def run_script(script: Path, folder: Path, env: dict[str, str | None], *args: str):
    """``bash SCRIPT ARGS`` with only ``env`` (None drops a variable) and the stand-ins first on
    PATH, PYTHON naming the python stand-in."""
    bin_dir = folder / "bin"
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}
    env = {k: v for k, v in {**base, **env}.items() if v is not None}
    return subprocess.run(
        ["bash", str(script), *args],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_batch(template: str, folder: Path, **env: str | None):
    """The batch script of ``slurm/TEMPLATE.sbatch`` in a job described by BATCH and ``env``."""
    return run_script(SLURM / f"{template}.sbatch", folder, {**BATCH, **env}, "configs/x.yaml")


SRUN_TEMPLATES = ["tapdist", "one_node", "multi_node", "bench_scaling"]  # srun starts the ranks


def starter(template: str) -> str:
    """The stand-in a template's batch script calls: bench_scaling runs the benchmark, which
    runs srun with the environment it was given; the others run srun."""
    return "python" if template == "bench_scaling" else "srun"


@pytest.mark.parametrize("template", [*SRUN_TEMPLATES, "multi_node_torchrun"])
def test_sbatch_templates_give_srun_their_environment_and_rank_0s_node(
    template, tmp_path, monkeypatch
):
    # 50000 hosts overflow the pipe from scontrol: `| head -n 1` would end it by SIGPIPE (141)
    stand_ins(tmp_path, hosts=50000)
    done = run_batch(template, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr
    _, env = recorded(tmp_path, starter(template))
    # ALL: srun passes the steps this environment also where sbatch ran with --export=NONE
    assert env["SLURM_EXPORT_ENV"] == "ALL"
    assert (env["MASTER_ADDR"], env["OMP_NUM_THREADS"]) == ("gpu00001", "1")
    if template == "multi_node_torchrun":
        return  # torchrun gives its ranks their MASTER_ADDR

    def no_scontrol(cmd, **kwargs):  # the step's container has no Slurm tools
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr("tapdist.dist.launch.subprocess.run", no_scontrol)
    rank = dict(env, SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NODEID="1")
    rank.update(SLURM_STEP_NODELIST=env["SLURM_JOB_NODELIST"], SLURM_STEP_NUM_TASKS="8")
    assert detect_launch(env=rank) == Launch("slurm", 5, 8, 1, 4, "gpu00001", slurm_port(rank))


@pytest.mark.parametrize("template", [*SRUN_TEMPLATES, "multi_node_torchrun"])
def test_sbatch_templates_warn_when_ntasks_caps_the_tasks_per_node(template, tmp_path):
    # `sbatch --ntasks=2 --nodes=2 --ntasks-per-node=4`: --ntasks wins (sbatch(1))
    stand_ins(tmp_path)
    done = run_batch(template, tmp_path, SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="1(x2)")
    assert done.returncode == 0, done.stderr
    assert "WARNING: 2 tasks, not the 2 node(s) x 4 tasks per node asked for" in done.stderr
    assert (tmp_path / f"{starter(template)}.args").exists()  # and the job goes on


def test_torchrun_template_rendezvous_below_the_ephemeral_ports(tmp_path):
    stand_ins(tmp_path)
    assert run_batch("multi_node_torchrun", tmp_path).returncode == 0
    args, _ = recorded(tmp_path, "srun")
    # job 15000: 20000 + 15000 % 20000 = 35000 lay in Linux's ephemeral range (32768 and up)
    assert "--rdzv_endpoint=gpu00001:22232" in args and "--nproc_per_node=4" in args
    (tmp_path / "srun.args").unlink()
    (tmp_path / "scontrol.args").unlink()
    assert run_batch("multi_node_torchrun", tmp_path, MASTER_ADDR="login7").returncode == 0
    assert "--rdzv_endpoint=login7:22232" in recorded(tmp_path, "srun")[0]
    assert not (tmp_path / "scontrol.args").exists()  # an exported MASTER_ADDR is kept


def test_bench_scaling_without_task_options_has_one_task_per_node(tmp_path):
    stand_ins(tmp_path)
    done = run_batch("bench_scaling", tmp_path, SLURM_NTASKS=None, SLURM_NTASKS_PER_NODE=None)
    assert done.returncode == 0, done.stderr
    args, _ = recorded(tmp_path, "python")
    assert args[args.index("--world") :][:4] == ["--world", "1", "2", "--threads"]


def test_torchrun_script_needs_node_rank_on_several_nodes(tmp_path):
    stand_ins(tmp_path)
    several = {"NPROC": "2", "NNODES": "2", "MASTER_ADDR": "node0"}
    done = run_script(TORCHRUN_SH, tmp_path, several, "configs/x.yaml")
    assert done.returncode == 2
    assert "NNODES=2 needs NODE_RANK, this node's index from 0 to 1" in done.stderr
    assert not (tmp_path / "python.args").exists()
    done = run_script(TORCHRUN_SH, tmp_path, dict(several, NODE_RANK="1"), "configs/x.yaml")
    assert done.returncode == 0, done.stderr
    args, _ = recorded(tmp_path, "python")
    assert args[:5] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
                        "--node_rank=1"]  # fmt: skip


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("pkill") is None, reason="needs pkill (procps)")
def test_torchrun_script_stops_cleanly_on_sigusr1_to_the_ranks(tmp_path):
    """SIGUSR1 to the launcher is ignored (by default it would kill torchrun and orphan the
    ranks); SIGUSR1 to the ranks, `pkill -USR1 -P PID`, ends the run with a checkpoint and
    exit code 0."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, NPROC="2", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    for name in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(name, None)
    longer = ["--set", "federation.rounds=40", "--set", "train.local_steps=4"]
    cmd = ["bash", str(TORCHRUN_SH), str(SMOKE_CONFIG), "--run-dir", str(run_dir), *longer]
    log = (tmp_path / "log").open("w")
    launcher = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert launcher.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "no round finished in 300 s"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGUSR1)
        time.sleep(1)
        assert launcher.poll() is None, "SIGUSR1 ended torchrun"
        subprocess.run(["pkill", "-USR1", "-P", str(launcher.pid)], check=True, timeout=30)
        assert launcher.wait(timeout=300) == 0, (tmp_path / "log").read_text()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "log").read_text()
    assert "stopped by a stop signal after a checkpoint" in output
    assert not (run_dir / "results.json").exists(), "the run finished before the signal"
    assert list((run_dir / "checkpoints").glob("*/MANIFEST.json"))


@pytest.mark.parametrize("munge_user", [True, False])
def test_local_cluster_runs_munged_as_root_without_a_munge_user(munge_user, tmp_path):
    """`local_cluster.sh up` as far as starting munged, every tool it runs a stand-in (the one
    for munged fails, so nothing past it runs): the munge user owns munged's folders and runs
    it where it exists, else root does."""
    if os.geteuid() != 0:
        pytest.skip("local_cluster.sh up runs as root (it opens its lock in /run/lock)")
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and "Generated by tapdist" not in conf.read_text():
        pytest.skip(f"{conf} is not local_cluster.sh's; up stops before munged")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = 'echo "$(basename "$0") $*" >>"{log}"\n'.format(log=tmp_path / "calls")
    # make the folders the script needs under tmp_path; never touch the system's
    make_own = f'for a; do [[ $a == {tmp_path}/* ]] && mkdir -p "$a"; done; exit 0\n'
    scripts = {
        # root, and a munge user or none
        "id": f"[[ $1 == -u ]] && echo 0 || [[ $1 != munge ]] || exit {int(not munge_user)}\n",
        "install": make_own,
        "munged": "exit 1\n",  # up stops here ("munged did not start")
        "munge": "exit 1\n",  # munge -n | unmunge fails: munged is not running
        "runuser": 'shift 3; exec "$@"\n',  # runuser -u munge -- COMMAND
    }
    tools = ["slurmctld", "slurmd", "srun", "sinfo", "scontrol", "unmunge", "flock"]
    tools += ["chown", "chmod", "mungekey", "dd"]
    for name in [*scripts, *tools]:
        (bin_dir / name).write_text("#!/bin/bash\n" + record + scripts.get(name, "exit 0\n"))
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TAPDIST_SLURM_DIR": str(tmp_path / "state")}
    done = subprocess.run(
        ["bash", str(SLURM / "local_cluster.sh"), "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "munged did not start" in done.stderr, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    owner = "-o munge -g munge " if munge_user else ""
    assert f"install -d {owner}-m 0755 /run/munge" in calls
    assert f"install -d {owner}-m 0700 /var/lib/munge" in calls
    assert any(c.startswith("munged --force") for c in calls)
    assert any(c.startswith("runuser -u munge -- munged --force") for c in calls) == munge_user
