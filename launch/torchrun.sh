#!/usr/bin/env bash
# Launch `tapdist train` with torchrun: one node, or one node of several.
#
#   launch/torchrun.sh CONFIG [--set section.key=value ...] [--run-dir DIR]
#
# Environment knobs (defaults in brackets):
#   NPROC        ranks on this node [number of GPUs, else 2]; one rank per GPU under NCCL
#   NNODES       nodes in the job [1]         NODE_RANK   this node's index [0]
#   MASTER_ADDR  address of node 0 [127.0.0.1] MASTER_PORT rendezvous port [29500]
#   PYTHON       interpreter with tapdist installed [python3]
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
NPROC=${NPROC:-$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2)}
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    -m tapdist train "$@"
