import sys

import pytest
import torch

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
    assert launch.master_port == 20000 + 1234 * 97 % 20000
    other_step = detect_launch(env=dict(SRUN, SLURM_STEP_ID="1"))
    assert other_step.master_port != launch.master_port


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
