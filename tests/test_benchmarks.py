"""The benchmark scripts run end to end at tiny sizes and write the JSON their reports cite.

No timing is asserted: each script must run (its own ranks, or under mpiexec and sbatch) and
report numbers of the right kind: positive times, a positive efficiency, bytes on the wire well
below a full upload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOKE_CONFIG, unavailable, venv_tool

from benchmarks import clients, comm, round_bytes, scaling
from benchmarks import round as round_bench
from benchmarks.common import markdown_table, rank_command, timed
from tapdist.config import load_config
from tapdist.dist import SingleProcessContext
from tapdist.models.federated import TapFederation

pytestmark = pytest.mark.multiproc

SMOKE = str(SMOKE_CONFIG.relative_to(ROOT))
FLAVA, VILT = "configs/paper_flava.yaml", "configs/paper_vilt.yaml"
ONE_ROUND = ["--set", "bench.warmup=0", "--set", "bench.repeats=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def run_main(module, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    assert module.main([*args, "--json", str(out), *ONE_ROUND]) == 0
    return json.loads(out.read_text())


def run_command(cmd: list[str], **env: str) -> None:
    done = subprocess.run(
        cmd, cwd=ROOT, env=dict(ENV, **env), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"


def check_timing_row(row: dict, world: int) -> None:
    assert row["world"] == world
    assert row["round_params"] > 0 and row["round_tensors"] > 0
    assert row["pack_ms"] > 0 and row["finalize_ms"] > 0
    assert len(row["uploads_per_rank"]) == world
    assert sum(row["uploads_per_rank"]) == len(row["round_clients"])  # each packed on its host
    assert row["union_ms"] >= 0.99 * (row["pack_ms"] + row["finalize_ms"])
    if world == 1:  # one rank sends nothing: no bandwidth, no efficiency
        assert row["wire_bytes"] == 0 and row["efficiency"] is None
        return
    itemsize = {"fp64": 8, "fp32": 4}.get(row["dtype"])
    if itemsize:
        assert row["wire_bytes"] > itemsize * row["round_params"]  # values plus counts
    assert row["raw_ms"] > 0 and row["all_reduce_ms"] > 0
    assert 0 < row["efficiency"] and 0 < row["all_reduce_efficiency"]
    assert row["raw_gbps"] > 0 and row["union_gbps"] > 0


def test_comm_times_the_union_path_against_a_raw_all_reduce_over_gloo(tmp_path):
    result = run_main(
        comm,
        tmp_path,
        *("--backend", "gloo", "--world", "2", "--dtype", "fp64", "bf16"),
        *("--config", SMOKE, "--bytes-configs", SMOKE),
    )
    assert [(r["backend"], r["dtype"]) for r in result["timing"]] == [
        ("gloo", "fp64"),
        ("gloo", "bf16"),
    ]
    for row in result["timing"]:
        check_timing_row(row, world=2)
    fp64, bf16 = result["timing"]
    assert bf16["wire_bytes"] < fp64["wire_bytes"] / 3  # bf16 values, fp32 counts
    assert [r["client"] for r in result["client_bytes"]] == [0, 1, 2, 3, 4]
    assert result["hardware"]["cpus"] >= 1 and result["settings"]["repeats"] == 1


def test_comm_counts_paper_clients_bytes_on_the_meta_device(tmp_path):
    result = run_main(
        comm,
        tmp_path,
        *("--world", "--bytes-configs", FLAVA, VILT),
    )
    assert result["timing"] == []
    rows = result["client_bytes"]
    assert len(rows) == 60
    for row in rows:
        wire = row["wire_bytes"]
        assert wire["bf16"] < wire["fp32"] < wire["fp64"] < row["full_upload_bytes"]
        assert row["shrink"]["fp32"] == pytest.approx(row["full_upload_bytes"] / wire["fp32"])
    # FLAVA client 7 (CIFAR-100 + AG News): 4.84M trainable next to both frozen towers
    client7 = rows[7]
    assert client7["tasks"] == ["cifar100", "agnews"]
    assert client7["trainable_params"] == pytest.approx(4.84e6, rel=0.01)
    assert client7["shrink"]["fp32"] > comm.TARGET_SHRINK
    summary = {(s["config"], s["dtype"]): s for s in result["client_bytes_summary"]}
    assert all(s["shrink_mean_client"] > 1 for s in summary.values())
    assert (
        summary[(FLAVA, "bf16")]["shrink_mean_client"]
        > summary[(FLAVA, "fp32")]["shrink_mean_client"]
    )


def test_comm_one_rank_packs_and_averages_and_sends_nothing():
    cfg = load_config(SMOKE_CONFIG, ["federation.clients_per_round=2"])
    work = comm.round_of(cfg, SingleProcessContext(), "median")
    assert work.index in range(cfg.federation.rounds) and len(work.sampled) == 2
    assert len(work.uploads) == 2  # one rank hosts every sampled client
    for dtype in ("fp64", "bf16"):
        row = comm.measure(SingleProcessContext(), work, dtype, warmup=0, repeats=1)
        check_timing_row({**row, "world": 1}, world=1)


@pytest.mark.integration
def test_comm_under_mpiexec_with_the_mpi_backend(tmp_path):
    mpiexec = venv_tool("mpiexec")
    if mpiexec is None:
        unavailable("mpiexec not found: pip install 'tapdist[mpi-wheel]'")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        unavailable("mpi4py not installed: pip install 'tapdist[mpi-wheel]'")
    out = tmp_path / "comm.json"
    run_command(
        [
            *(mpiexec, "-n", "2", sys.executable, "-m", "benchmarks.comm"),
            *("--backend", "mpi", "--dtype", "fp32", "bf16", "--config", SMOKE),
            "--bytes-configs",
            *("--json", str(out), *ONE_ROUND),
        ]
    )
    result = json.loads(out.read_text())  # MPI has no bf16 sum: skipped, fp32 kept
    assert [(r["backend"], r["world"], r["dtype"]) for r in result["timing"]] == [
        ("mpi", 2, "fp32")
    ]
    check_timing_row(result["timing"][0], world=2)


def test_scaling_runs_the_round_loop_weak_and_strong(tmp_path):
    result = run_main(
        scaling,
        tmp_path,
        *("--world", "2", "--clients", "4", "--clients-per-rank", "1"),
        *("--local-steps", "1", "--samples", "8"),
    )
    rows = {r["mode"]: r for r in result["rows"]}
    assert sorted(rows) == ["strong", "weak"]
    weak, strong = rows["weak"], rows["strong"]
    assert (weak["world"], weak["clients_per_round"], weak["clients_per_rank"]) == (2, 2, [1, 1])
    assert (strong["clients_per_round"], strong["clients_per_rank"]) == (4, [2, 2])
    for row in rows.values():
        assert row["backend"] == "gloo" and row["bytes_sent_per_rank"] > 0
        assert row["round_s"] > 0 and row["client_rounds_per_s"] > 0
        assert row["efficiency"] == row["speedup"] == 1.0  # the only world size measured


def test_scaling_efficiency_against_the_smallest_world():
    rows = [
        {"mode": "weak", "world": 1, "round_s": 2.0, "client_rounds_per_s": 1.0},
        {"mode": "weak", "world": 4, "round_s": 2.5, "client_rounds_per_s": 3.2},
        {"mode": "strong", "world": 2, "round_s": 4.0, "client_rounds_per_s": 2.0},
        {"mode": "strong", "world": 4, "round_s": 2.5, "client_rounds_per_s": 3.2},
    ]
    out = {(r["mode"], r["world"]): r for r in scaling.add_efficiency(rows)}
    assert out[("weak", 4)]["efficiency"] == pytest.approx(0.8)
    assert out[("weak", 4)]["speedup"] == pytest.approx(3.2)
    assert out[("strong", 4)]["efficiency"] == pytest.approx(0.8)  # 2 * 4.0 / (4 * 2.5)
    assert out[("strong", 4)]["speedup"] == pytest.approx(1.6)


def test_scaling_strong_mode_past_its_clients_lets_ranks_idle(tmp_path):
    args = scaling._parser().parse_args(["--config", str(SMOKE_CONFIG), "--clients", "2"])
    cfg = scaling.federation_config(args, "strong", 4)
    assert cfg.federation.clients == 2 and cfg.dist.allow_idle_ranks
    assert not scaling.federation_config(args, "strong", 2).dist.allow_idle_ranks
    args.clients = None  # the default: as many clients as ranks, at least 4
    assert scaling.federation_config(args, "strong", 8).federation.clients == 8
    assert scaling.federation_config(args, "strong", 2).federation.clients == 4
    node = {"device": "cpu", "cores_per_node": 4}
    rows = [{**node, "world": w, "ranks_per_node": r} for w, r in ((4, 4), (8, 4), (8, 8))]
    assert scaling.oversubscribed(rows, threads=1) == [8]  # 8 ranks on one 4-core node
    assert scaling.oversubscribed(rows, threads=2) == [4, 8]  # 2 threads each


def test_clients_memory_grows_by_client_states(tmp_path):
    result = run_main(clients, tmp_path, *("--clients", "4", "--per-round", "2", "--samples", "8"))
    (row,) = result["rows"]
    assert row["clients_per_rank"] == 4 and row["per_round"] == 2
    assert row["clients_added_by_fill"] == 2
    assert row["states_on"] == ["cpu"]
    # a news client of the smoke model: 25,892 fp32 parameters, plus its per-task losses
    assert row["state_bytes_per_client"] == pytest.approx(4 * 25_892, rel=0.01)
    assert row["data_bytes_per_client"] > 0
    assert row["rss_growth_per_client"] is not None
    assert row["fill_s"] > 0 and row["round_s"] > 0
    assert row["memory_after_fill"]["rss"] > 0 and row["cuda_growth_per_client"] is None


def test_round_bytes_counts_a_config_schedule(tmp_path, capsys):
    out = tmp_path / "round_bytes.json"
    assert round_bytes.main([FLAVA, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["rounds"] == 200 and len(row["round_params"]) == 200
    assert row["union_params"] == pytest.approx(114.7e6, rel=0.001)
    assert 0 < row["round_params_mean"] < row["round_params_max"] <= row["union_params"]
    # a round's buffer against its two clients' full fp32 uploads, frozen towers included
    assert row["full_upload_bytes_mean"] > 8 * row["round_params_mean"]
    shrink = row["shrink_mean"]
    assert 1 < shrink["fp64"] < shrink["fp32"] < shrink["bf16"]
    assert shrink["fp32"] == pytest.approx(2 * shrink["fp64"], rel=1e-3)
    assert "| `configs/paper_flava.yaml` | 200 | 114.7M |" in capsys.readouterr().out


def test_round_times_a_tap_client_round_and_counts_its_flops(tmp_path):
    out = tmp_path / "round.json"
    args = ["--config", FLAVA, "--tiny", "--steps", "2", "--warmup", "0", "--repeats", "1"]
    assert round_bench.main([*args, "--bare", "2", "--profile", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["tasks"] == ["cifar100", "agnews"] and row["micro_batches"] == 4
    assert row["round_s"] >= sum(row["phases_s"].values()) > 0
    assert row["micro_batch_ms"] > 0 and row["bare_micro_batch_ms"] > 0
    assert row["tflop_per_micro_batch"] > 0 and row["mfu"] is None  # no peak known for a CPU
    assert row["profile"]["aten_ops"] > 100
    ops = row["operators_per_micro_batch"]
    assert 0 < ops["views"] < ops["total"]


def test_round_count_counts_a_micro_batch_without_timing_it(tmp_path, capsys):
    out = tmp_path / "count.json"
    args = ["--config", FLAVA, "--tiny", "--count", "--device", "cpu", "--amp", "bf16", "off"]
    assert round_bench.main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "paper_flava, bf16:\n| operator | calls | MiB written |" in printed
    assert "| `add` |" in printed and "| `mm` |" not in printed  # memory-bound ones only
    bf16, fp32 = json.loads(out.read_text())["results"]
    assert (bf16["amp"], fp32["amp"]) == ("bf16", "fp32") and "round_s" not in bf16
    for row in (bf16, fp32):
        ops = row["operators_per_micro_batch"]
        assert row["tflop_per_micro_batch"] > 0 and 0 < ops["views"] < ops["total"]
        assert ops["memory_bound_mib_written"] > 0
        by_operator = ops["by_operator"]  # the non-view operators, the largest outputs first
        assert sum(op["calls"] for op in by_operator.values()) == ops["total"] - ops["views"]
        sizes = [op["mib_written"] for op in by_operator.values()]
        assert sizes == sorted(sizes, reverse=True)
        kinds = {name: op["kind"] for name, op in by_operator.items()}
        assert (kinds["mm"], kinds["add"], kinds["empty_like"]) == (
            "matmul",
            "memory-bound",
            "allocation",  # the CPU's dropout allocates its mask, then fills it
        )
        allocations = [op["calls"] for op in by_operator.values() if op["kind"] == "allocation"]
        assert sum(allocations) == ops["allocations"] > 0
        bound = [op["mib_written"] for op in by_operator.values() if op["kind"] == "memory-bound"]
        assert sum(bound) == pytest.approx(ops["memory_bound_mib_written"])
    # fp32 casts nothing; bf16 casts matmul inputs and trainable weights
    assert fp32["operators_per_micro_batch"]["casts"] == 0
    assert bf16["operators_per_micro_batch"]["casts"] > 0


def test_round_count_sees_frozen_weights_read_without_casts():
    cfg = load_config(ROOT / FLAVA, [*round_bench.TINY, "train.amp=bf16"])
    federation = TapFederation(cfg, torch.device("cpu"))
    start = federation.initial_substate(7)
    copies = round_bench.count_operators(federation, 7, start, federation.device)
    federation.trainer.weights = None  # autocast casts each frozen weight where it is read
    casting = round_bench.count_operators(federation, 7, start, federation.device)
    assert copies["casts"] < casting["casts"] and copies["total"] < casting["total"]


def test_helpers():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n| --- | --- |\n| 1 | x |"
    calls = []
    assert len(timed(lambda: calls.append(1), warmup=2, repeats=3)) == 3 and len(calls) == 5
    args = ["--worker"]
    assert rank_command("torchrun", 1, "benchmarks.comm", args) == [
        sys.executable,
        "-m",
        "benchmarks.comm",
        "--worker",
    ]
    torchrun = rank_command("torchrun", 3, "benchmarks.comm", args, "--max-restarts=0")
    assert torchrun[:5] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
    ]
    assert torchrun[5:] == ["--max-restarts=0", "-m", "benchmarks.comm", "--worker"]


@pytest.mark.integration
def test_bench_scaling_sbatch_runs_one_srun_step_per_world_size(tmp_path, slurm_cluster):
    log, out = tmp_path / "job.out", tmp_path / "scaling.json"
    run_command(
        [
            *(venv_tool("sbatch"), "--wait", "--ntasks=2", "--overcommit", f"--output={log}"),
            str(ROOT / "slurm" / "bench_scaling.sbatch"),
            *("--world", "2", "--modes", "weak", "--clients-per-rank", "1", "--local-steps", "1"),
            *("--samples", "8", "--json", str(out), *ONE_ROUND),
        ],
        PYTHON=sys.executable,
    )
    result = json.loads(out.read_text())
    assert [(r["world"], r["backend"]) for r in result["rows"]] == [(2, "gloo")]
    assert result["settings"]["launcher"] == "srun"
    assert "| weak | 2 | 2 |" in log.read_text()
