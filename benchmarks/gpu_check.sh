#!/usr/bin/env bash
# tapdist on one GPU, in one go: the same federation on the CPU and the GPU (fp32, bf16, NCCL),
# then the client-round benchmark of the paper settings in bf16 with its fp32 baseline.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [round benchmark options]
#
# Writes OUT_DIR/smoke-*/ (runs), OUT_DIR/agreement.txt and OUT_DIR/round-CONFIG-PRECISION.json.
# Each step has its own time limit so a slow one cannot starve the rest; the whole script needs
# at most 10 minutes (one device call). Give the device back as soon as it ends: an idle machine still counts.
set -uo pipefail
declare -A limits
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [round options]}
shift
export HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

smoke() {  # name, launcher prefix..., then --set overrides
    local name=$1
    shift
    timeout 90 "$@" configs/smoke.yaml --run-dir "$out/smoke-$name" >"$out/smoke-$name.log" 2>&1 \
        || { echo "smoke-$name failed:"; tail -20 "$out/smoke-$name.log"; }
}
smoke cpu python -m tapdist train --set dist.device=cpu --set train.amp=off &
smoke cuda python -m tapdist train --set dist.device=cuda --set train.amp=off
smoke bf16 python -m tapdist train --set dist.device=cuda --set train.amp=bf16
smoke nccl torchrun --nproc_per_node=1 -m tapdist train --set dist.device=cuda \
    --set dist.backend=nccl --set train.amp=off
wait
python - "$out" <<'EOF' | tee "$out/agreement.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def metrics(name):
    path = out / f"smoke-{name}" / "results.json"
    if not path.exists():
        return None
    flat = {}
    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}/", value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[prefix + key] = float(value)
    walk("", json.loads(path.read_text()))
    return flat
base = metrics("cpu")
for name in ("cuda", "bf16", "nccl"):
    other = metrics(name)
    if base is None or other is None:
        print(f"{name}: missing results")
        continue
    diffs = {k: abs(base[k] - other[k]) / max(1.0, abs(base[k])) for k in base if k in other}
    worst = max(diffs, key=diffs.get)
    print(f"cpu fp32 vs {name}: {len(diffs)} metrics, max relative difference "
          f"{diffs[worst]:.2e} ({worst}: {base[worst]:.6g} vs {other[worst]:.6g})")
EOF

# one step per config and precision, each under its own limit, bf16 first
limits=([paper_flava]=150 [paper_vilt]=180)
for config in paper_flava paper_vilt; do
    timeout "${limits[$config]}" python -m benchmarks.round --config "configs/$config.yaml" --amp bf16 \
        --repeats 1 --json "$out/round-$config-bf16.json" "$@" \
        || echo "round $config bf16 ended with status $?"
done
for config in paper_flava paper_vilt; do
    timeout 90 python -m benchmarks.round --config "configs/$config.yaml" --amp off \
        --warmup 0 --repeats 1 --bare 10 --json "$out/round-$config-fp32.json" "$@" \
        || echo "round $config fp32 ended with status $?"
done
