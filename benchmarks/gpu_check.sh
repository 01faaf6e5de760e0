#!/usr/bin/env bash
# tapdist on one GPU, in one go: the GPU tests, the client-round benchmark of the paper settings
# in bf16 with CUDA graphs against its eager baseline in the same process, the smoke federation
# on the GPU (fp32 and bf16, with graphs) against the CPU, and last the device memory of 10 and
# 100 virtual clients on the rank.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [round benchmark options]
#
# Writes OUT_DIR/tests.log, OUT_DIR/round-CONFIG.json, OUT_DIR/agreement.txt and
# OUT_DIR/clients-N.json (the smoke runs themselves go to a temporary folder). Each step has its
# own time limit so a slow one cannot starve the rest: 12 min if every step ran into its limit,
# about 5.5 min without the clients step in the runs so far, so one device call of 600 s holds
# it. Give the device back as soon as it ends: an idle machine still counts.
set -uo pipefail
declare -A limits
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [round options]}
shift
export HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
mkdir -p "$out"
runs=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

timeout 75 python -m pytest -q -p no:cacheprovider -m gpu tests/ >"$out/tests.log" 2>&1
echo "GPU tests ended with status $? (tests.log):"
tail -5 "$out/tests.log"

# the eager baseline first: a run cut short keeps it
limits=([paper_flava]=170 [paper_vilt]=220)
for config in paper_flava paper_vilt; do
    timeout "${limits[$config]}" python -m benchmarks.round --config "configs/$config.yaml" \
        --amp bf16 --graphs off auto --warmup 2 --repeats 1 --bare 10 \
        --json "$out/round-$config.json" "$@" \
        || echo "round $config ended with status $?"
done

smoke() {  # name, then --set overrides
    local name=$1
    shift
    timeout 75 python -m tapdist train configs/smoke.yaml --run-dir "$runs/smoke-$name" "$@" \
        >"$runs/smoke-$name.log" 2>&1 || { echo "smoke-$name failed:"; tail -20 "$runs/smoke-$name.log"; }
}
smoke cpu --set dist.device=cpu --set train.amp=off &
smoke cuda --set dist.device=cuda --set train.amp=off
smoke bf16 --set dist.device=cuda --set train.amp=bf16
wait
python - "$runs" <<'EOF' | tee "$out/agreement.txt"
import json, sys
from pathlib import Path

runs = Path(sys.argv[1])
def metrics(name):
    path = runs / f"smoke-{name}" / "results.json"
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
for name in ("cuda", "bf16"):
    other = metrics(name)
    if base is None or other is None:
        print(f"{name}: missing results")
        continue
    diffs = {k: abs(base[k] - other[k]) / max(1.0, abs(base[k])) for k in base if k in other}
    worst = max(diffs, key=diffs.get)
    print(f"cpu fp32 vs {name} (CUDA graphs on): {len(diffs)} metrics, max difference "
          "(absolute below 1, relative above) "
          f"{diffs[worst]:.2e} ({worst}: {base[worst]:.6g} vs {other[worst]:.6g})")
EOF

# last, so a slow run cannot cut the rest short: what clients keep on the device
for n in 10 100; do
    timeout 50 python -m benchmarks.clients --set dist.device=cuda --clients "$n" \
        --json "$out/clients-$n.json" | tail -4 || echo "clients $n ended with status $?"
done
