#!/usr/bin/env bash
# Launch `tapdist train` with torchrun: one node, or one node of several.
#
#   launch/torchrun.sh CONFIG [--set section.key=value ...] [--run-dir DIR | --resume DIR]
#
# Environment knobs (defaults in brackets):
#   NPROC        ranks on this node [number of GPUs, else 2]; one rank per GPU under NCCL
#   NNODES       nodes in the job [1]
#   NODE_RANK    this node's index, 0 to NNODES-1 [0; required when NNODES > 1]
#   MASTER_ADDR  address of node 0 [127.0.0.1; required when NNODES > 1]
#   MASTER_PORT  rendezvous port on node 0 [29500]
#   PYTHON       interpreter with tapdist installed [python3]
# On one node without MASTER_ADDR or MASTER_PORT, torchrun picks a free port (--standalone), so
# several runs can share a machine. Start the script on every node with the same NNODES,
# MASTER_ADDR and MASTER_PORT and its own NODE_RANK. Under Slurm, slurm/ has sbatch templates.
# Stop a run cleanly (after the current round, with a checkpoint, exit code 0) with SIGUSR1 to
# the ranks, the children of this script's process: `pkill -USR1 -P PID`. torchrun (which this
# script becomes) ignores SIGUSR1; it passes SIGTERM and SIGINT on to the ranks, kills those
# still running 30 s later and exits with code 1. See launch/README.md.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,/^set -/{/^#/p;}' "$0" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
if [[ -z ${NPROC:-} ]]; then
    gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    NPROC=$((gpus > 0 ? gpus : 2))
fi
NNODES=${NNODES:-1}
if [[ $NNODES == 1 && -z ${MASTER_ADDR:-} && -z ${MASTER_PORT:-} ]]; then
    rendezvous=(--standalone)
elif [[ $NNODES != 1 && -z ${MASTER_ADDR:-} ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR, the address of node 0," \
        "set alike on every node" >&2
    exit 2
elif [[ $NNODES != 1 && -z ${NODE_RANK:-} ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs NODE_RANK, this node's index from 0 to" \
        "$((NNODES - 1)), different on every node" >&2
    exit 2
else
    rendezvous=(--node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
        --master_port="${MASTER_PORT:-29500}")
fi
# Left to its default, SIGUSR1 would kill torchrun and orphan the ranks (torch 2.13 starts each in
# a session of its own, so they outlive it). Ignored here, it reaches only the ranks it is sent to;
# the ranks install their own handler, which an inherited ignore does not prevent.
trap '' USR1
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    "${rendezvous[@]}" -m tapdist train "$@"
