"""Bad input stops `tapdist train` before it writes anything: exit code 2, one line on stderr
that names the file or key and what to do, no traceback (unless --debug), and an existing run
folder left byte for byte as it was, on every rank and under every launcher."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, start_slurm_cluster, torchrun_command, unavailable, venv_tool

from tapdist.cli import main
from tapdist.dist import DeviceError, Launch, device_for

SMOKE_HDF5 = ROOT / "configs" / "smoke_hdf5.yaml"
SPEC = ROOT / "configs" / "federations" / "smoke.yaml"
# a short run that leaves checkpoints, so that --resume has something to start from
SETTINGS = ["federation.rounds=1", "tap.finetune_steps=2", "federation.baselines=[]"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def train_args(config: Path, data: Path | None, *overrides: str) -> list[str]:
    """`train CONFIG` with SETTINGS, ``data.path=data`` and ``overrides``."""
    sets = [*SETTINGS, *([f"data.path={data}"] if data else []), *overrides]
    return ["train", str(config), *(a for s in sets for a in ("--set", s))]


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    from tapdist.data.build import build_federation

    out = tmp_path_factory.mktemp("fed") / "smoke.h5"
    build_federation(SPEC, out, progress=False)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, good_file) -> Path:
    """A real run folder: config, metrics, checkpoints, results and final states."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    code, err = run_subprocess([*train_args(SMOKE_HDF5, good_file), "--run-dir", str(run_dir)])
    assert code == 0, err
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "results.json").is_file()
    return run_dir


@pytest.fixture
def run_dir(finished_run, tmp_path) -> Path:
    """A copy of the finished run (file times kept) for one test to point a bad command at."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every path under ``folder`` (and the folder itself) -> (content, mtime in ns)."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
        for p in paths
    }


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """`tapdist ARGS` in this process: exit code and stderr."""
    code = main(args)
    return code, capsys.readouterr().err


def run_subprocess(args: list[str], timeout: int = 180) -> tuple[int, str]:
    """`python -m tapdist ARGS` as a separate process: exit code and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "tapdist", *args],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stderr


def assert_refused(code: int, err: str, words: list[str]) -> None:
    """Exit code 2, one `tapdist: ... error: ...` line holding ``words``, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("tapdist")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in err


# --- how each bad input is made ---------------------------------------------------------------


def edit_file(good: Path, out: Path, change) -> Path:
    """A copy of the federation file ``good`` with ``change(h5py.File)`` applied."""
    shutil.copy(good, out)
    with h5py.File(out, "r+") as f:
        change(f)
    return out


def replace_dataset(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def chunk_bytes(path: Path, dataset: str) -> tuple[int, int]:
    """(file offset, size) of the first chunk of ``dataset``."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    return info.byte_offset, info.size


def overwrite(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xa5" * count)


def corrupt_chunk(good: Path, out: Path, dataset: str) -> Path:
    """A copy of ``good`` with bytes in the middle of ``dataset``'s first chunk overwritten."""
    shutil.copy(good, out)
    offset, size = chunk_bytes(out, dataset)
    overwrite(out, offset + size // 2, 16)
    return out


def bad_yaml(tmp: Path, text: str) -> Path:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return path


def hdf5_config_with_tasks(tmp: Path, extra_task: str) -> Path:
    """smoke_hdf5.yaml listing the file's tasks plus ``extra_task`` under data.tasks."""
    tasks = [line for line in SPEC.read_text().splitlines() if line.startswith("  - {name:")]
    tasks.append(extra_task)
    text = SMOKE_HDF5.read_text() + "  tasks:\n" + "\n".join(tasks) + "\n"
    path = tmp / "with_tasks.yaml"
    path.write_text(text.replace("source: synthetic, ", ""))
    return path


def bert_dir(tmp: Path) -> Path:
    folder = tmp / "bert"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    return folder


# (id, args from (tmp_path, good_file), words the message holds)
CASES = [
    (
        "malformed_yaml",
        lambda tmp, good: ["train", str(bad_yaml(tmp, "run: [1, 2\n"))],
        ["bad.yaml", "not valid YAML"],
    ),
    (
        "unknown_section",
        lambda tmp, good: ["train", str(bad_yaml(tmp, "federaton: {rounds: 2}\n"))],
        ["unknown section 'federaton'", "did you mean 'federation'"],
    ),
    (
        "unknown_key",
        lambda tmp, good: ["train", str(bad_yaml(tmp, "federation: {roundz: 2}\n"))],
        ["federation.roundz", "did you mean 'rounds'"],
    ),
    (
        "wrong_type",
        lambda tmp, good: ["train", str(bad_yaml(tmp, "federation: {rounds: three}\n"))],
        ["federation.rounds", "an integer"],
    ),
    (
        "wrong_type_override",
        lambda tmp, good: train_args(SMOKE_HDF5, good, "dist.timeout_s=soon"),
        ["dist.timeout_s", "soon"],
    ),
    (
        "hdf5_missing",
        lambda tmp, good: train_args(SMOKE_HDF5, tmp / "none.h5"),
        ["none.h5: federation file not found", "tapdist data build"],
    ),
    (
        "hdf5_truncated",
        lambda tmp, good: train_args(SMOKE_HDF5, truncated(good, tmp / "cut.h5")),
        ["cut.h5: not a readable HDF5 file", "truncated", "tapdist data build"],
    ),
    (
        "hdf5_corrupt_metadata",
        lambda tmp, good: train_args(SMOKE_HDF5, corrupt_tasks(good, tmp / "bad.h5")),
        ["bad.h5", "corrupt", "tapdist data build"],
    ),
    (
        "hdf5_corrupt_samples",
        lambda tmp, good: train_args(
            SMOKE_HDF5, corrupt_chunk(good, tmp / "bad.h5", "clients/2/vqa/test/image")
        ),
        ["bad.h5: not a readable HDF5 file", "corrupt", "tapdist data build"],
    ),
    (
        "hdf5_task_missing_from_file",
        lambda tmp, good: train_args(
            hdf5_config_with_tasks(
                tmp,
                "  - {name: sports, kind: text_cls, modalities: [text], domains: [news], "
                "classes: 4}",
            ),
            good,
        ),
        ["data.tasks do not match", "smoke.h5", "not in the file: sports", "remove data.tasks"],
    ),
    (
        "hdf5_wrong_shape",
        lambda tmp, good: train_args(
            SMOKE_HDF5,
            edit_file(
                good,
                tmp / "bad.h5",
                lambda f: replace_dataset(
                    f, "clients/0/objects/train/image", np.zeros((32, 3, 32, 32), np.uint8)
                ),
            ),
        ),
        ["bad.h5: /clients/0/objects/train/image: shape (32, 3, 32, 32)", "(N, 3, 64, 64)"],
    ),
    (
        "hdf5_wrong_dtype",
        lambda tmp, good: train_args(
            SMOKE_HDF5,
            edit_file(
                good,
                tmp / "bad.h5",
                lambda f: replace_dataset(
                    f, "clients/1/news/train/label", np.zeros(48, np.float32)
                ),
            ),
        ),
        ["/clients/1/news/train/label: dtype float32, expected int32"],
    ),
    (
        "hdf5_label_out_of_range",
        lambda tmp, good: train_args(
            SMOKE_HDF5,
            edit_file(
                good,
                tmp / "bad.h5",
                lambda f: f["clients/0/objects/test/label"].__setitem__(3, 10),
            ),
        ),
        ["/clients/0/objects/test/label: values span", "10", "of the task's 10 classes"],
    ),
    (
        "hdf5_token_out_of_range",  # token ids are checked when a rank reads its clients
        lambda tmp, good: train_args(
            SMOKE_HDF5,
            edit_file(
                good,
                tmp / "bad.h5",
                lambda f: f["clients/4/law_qa/test/text"].__setitem__((0, 0), 1000),
            ),
        ),
        ["/clients/4/law_qa/test/text: values span", "below vocab_size 1000"],
    ),
    (
        "hdf5_answer_len_mismatch",
        lambda tmp, good: train_args(SMOKE_HDF5, good, "model.answer_len=6"),
        ["model.answer_len = 6", "set model.answer_len = 4"],
    ),
    (
        "pretrained_missing",
        lambda tmp, good: train_args(SMOKE_HDF5, good, f"model.pretrained={tmp / 'nowhere'}"),
        ["model.pretrained", "nowhere: no such directory"],
    ),
    (
        "pretrained_wrong_backbone",
        lambda tmp, good: train_args(SMOKE_HDF5, good, f"model.pretrained={bert_dir(tmp)}"),
        ["holds a 'bert' model but model.backbone = flava"],
    ),
    pytest.param(
        "cuda_without_gpu",
        lambda tmp, good: train_args(SMOKE_HDF5, good, "dist.device=cuda"),
        ["launch error", "dist.device = cuda", "sees no CUDA device", "dist.device=cpu"],
        marks=NO_CUDA,
    ),
    pytest.param(
        "nccl_without_gpu",
        lambda tmp, good: train_args(SMOKE_HDF5, good, "dist.backend=nccl"),
        ["launch error", "dist.backend = nccl", "sees no CUDA device", "gloo"],
        marks=NO_CUDA,
    ),
    (
        "nccl_on_cpu",
        lambda tmp, good: train_args(SMOKE_HDF5, good, "dist.backend=nccl", "dist.device=cpu"),
        ["dist.backend = nccl needs CUDA devices but dist.device = cpu"],
    ),
]


def truncated(good: Path, out: Path) -> Path:
    data = good.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def corrupt_tasks(good: Path, out: Path) -> Path:
    """A copy of ``good`` with the object header of /tasks/news overwritten."""
    shutil.copy(good, out)
    with h5py.File(out, "r") as f:
        offset = h5py.h5o.get_info(f["tasks/news"].id).addr
    overwrite(out, offset, 64)
    return out


@pytest.mark.parametrize(
    "name, make, words", CASES, ids=lambda c: c if isinstance(c, str) else None
)
@pytest.mark.parametrize("how", ["--run-dir", "--resume"])
def test_bad_input_leaves_the_run_folder_untouched(
    name, make, words, how, tmp_path, run_dir, good_file, capsys
):
    before = snapshot(run_dir)
    code, err = run_cli([*make(tmp_path, good_file), how, str(run_dir)], capsys)
    assert_refused(code, err, words)
    assert snapshot(run_dir) == before


# --- the same in separate processes: the exit code and stderr a user sees ---------------------


@pytest.mark.parametrize(
    "name", ["malformed_yaml", "hdf5_truncated", "hdf5_corrupt_samples", "cuda_without_gpu"]
)
def test_a_separate_process_exits_2_without_traceback(name, tmp_path, run_dir, good_file):
    if name == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    make, words = next((c[1], c[2]) for c in map(_values, CASES) if c[0] == name)
    before = snapshot(run_dir)
    code, err = run_subprocess([*make(tmp_path, good_file), "--run-dir", str(run_dir)])
    assert_refused(code, err, words)
    assert snapshot(run_dir) == before


def _values(case) -> tuple:
    return case.values if hasattr(case, "values") else case


def test_debug_adds_the_traceback(tmp_path, run_dir, good_file):
    args = train_args(SMOKE_HDF5, truncated(good_file, tmp_path / "cut.h5"))
    before = snapshot(run_dir)
    code, err = run_subprocess(["--debug", *args, "--resume", str(run_dir)])
    assert code == 2
    assert "Traceback (most recent call last)" in err and "DataError" in err
    assert err.rstrip().splitlines()[-1].startswith("tapdist: data error: ")
    assert snapshot(run_dir) == before


# --- under launchers: every rank stops, none hangs, nothing is written --------------------------


def launched(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_torchrun_damage_one_rank_reads_stops_every_rank(tmp_path, run_dir, good_file):
    """Client 1 lives on rank 1 (round robin over 3 ranks); only rank 1 reads its samples. It
    reports the damage, the other ranks stop with it, before anything is written."""
    bad = corrupt_chunk(good_file, tmp_path / "bad.h5", "clients/1/news/train/text")
    before = snapshot(run_dir)
    args = ["-m", "tapdist", *train_args(SMOKE_HDF5, bad), "--resume", str(run_dir)]
    done = launched(torchrun_command(args))
    assert done.returncode != 0
    err = done.stderr
    assert "tapdist (rank 1): data error: " in err and "bad.h5: not a readable HDF5 file" in err
    codes = {int(c) for c in re.findall(r"exitcode\s*: (-?\d+)", err)}
    assert 2 in codes and codes <= {2, -15}, err  # 2, or the agent's SIGTERM
    assert "unexpected error" not in err
    assert snapshot(run_dir) == before


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_mpiexec_every_rank_exits_2_on_a_damaged_file(tmp_path, run_dir, good_file, backend):
    mpiexec = venv_tool("mpiexec")
    if mpiexec is None:
        unavailable("mpiexec not found: pip install 'tapdist[mpi-wheel]'")
    bad = corrupt_chunk(good_file, tmp_path / "bad.h5", "clients/1/news/train/text")
    before = snapshot(run_dir)
    args = train_args(SMOKE_HDF5, bad, f"dist.backend={backend}")
    done = launched(
        [mpiexec, "-n", "3", sys.executable, "-m", "tapdist", *args, "--resume", str(run_dir)]
    )
    assert done.returncode == 2, done.stderr
    assert "tapdist (rank 1): data error: " in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(run_dir) == before


@pytest.mark.integration
def test_srun_every_task_exits_2_without_a_gpu(tmp_path, run_dir, good_file):
    """Without --kill-on-bad-exit srun waits for every task, so each must end by itself."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    srun = venv_tool("srun")
    if srun is None:
        unavailable("srun not found: apt-get install slurm-wlm munge")
    start_slurm_cluster()
    before = snapshot(run_dir)
    args = train_args(SMOKE_HDF5, good_file, "dist.device=cuda")
    cmd = [srun, "-n", "3", "--overcommit", "--time=5", sys.executable, "-m", "tapdist", *args]
    done = launched([*cmd, "--run-dir", str(run_dir)])
    assert done.returncode == 2, done.stderr
    assert set(re.findall(r"Exited with exit code (\d+)", done.stderr)) == {"2"}, done.stderr
    assert "Killed" not in done.stderr
    for rank in range(3):
        assert f"tapdist: launch error: dist.device = cuda but rank {rank} sees no CUDA" in (
            done.stderr
        )
    assert snapshot(run_dir) == before


# --- more ranks on a node than GPUs: a pure function, checked with any GPU count ---------------


def node(local_world: int, local_rank: int = 0, launcher: str = "torchrun") -> Launch:
    return Launch(launcher, local_rank, local_world, local_rank, local_world, "h", 1)


@pytest.mark.parametrize(
    "launch, gpus, device, backend, expected",
    [
        (node(4, 3), 4, "auto", "auto", "cuda:3"),
        (node(4, 3), 8, "cuda", "nccl", "cuda:3"),
        (node(2, 1), 0, "auto", "auto", "cpu"),
        (node(4, 3), 2, "auto", "auto", "cpu"),  # falls back, with a warning
        (node(4, 3), 2, "auto", "gloo", "cpu"),
        (node(4, 3, "slurm"), 1, "cuda", "auto", "cuda:0"),  # srun --gpus-per-task=1
        (node(3), 8, "cpu", "gloo", "cpu"),
    ],
)
def test_device_for_a_node(launch, gpus, device, backend, expected):
    assert device_for(launch, gpus, device, backend) == torch.device(expected)


@pytest.mark.parametrize(
    "launch, gpus, device, backend, words",
    [
        (node(4, 3), 2, "cuda", "auto", ["dist.device = cuda", "4 ranks on this node but only 2"]),
        (node(4, 3), 2, "auto", "nccl", ["dist.backend = nccl", "--nproc_per_node=2"]),
        (node(8, 5), 4, "auto", "nccl", ["8 ranks", "only 4 GPU(s)", "--ntasks-per-node=4"]),
        (node(4, 3, "slurm"), 2, "cuda", "auto", ["4 ranks on this node but only 2"]),
        (node(1), 0, "cuda", "auto", ["dist.device = cuda but rank 0 sees no CUDA device"]),
        (node(2, 1), 0, "auto", "nccl", ["dist.backend = nccl but rank 1 sees no CUDA device"]),
        (node(1), 2, "cpu", "nccl", ["dist.backend = nccl needs CUDA devices"]),
    ],
)
def test_too_few_gpus_for_the_ranks_on_a_node(launch, gpus, device, backend, words):
    with pytest.raises(DeviceError) as err:
        device_for(launch, gpus, device, backend)
    for word in words:
        assert word in str(err.value)
