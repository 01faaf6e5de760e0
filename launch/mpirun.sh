#!/usr/bin/env bash
# Launch `tapdist train` with mpirun/mpiexec (MPICH or Open MPI).
#
#   launch/mpirun.sh CONFIG [--set section.key=value ...] [--run-dir DIR]
#
# Environment knobs (defaults in brackets):
#   NP           number of ranks [2]
#   MPIRUN       the MPI launcher [mpirun, else mpiexec]
#   MPIRUN_ARGS  extra launcher flags, e.g. a hostfile ["" ]
#   PYTHON       interpreter with tapdist installed [python3]
# Collectives use gloo/NCCL after an mpi4py rendezvous; add `--set dist.backend=mpi` to move
# the parameters with MPI Allreduce instead.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
MPIRUN=${MPIRUN:-$(command -v mpirun || command -v mpiexec || true)}
if [[ -z $MPIRUN ]]; then
    echo "launch/mpirun.sh: no mpirun or mpiexec on PATH; install an MPI or" \
         "pip install 'tapdist[mpi-wheel]'" >&2
    exit 2
fi
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of flags
exec "$MPIRUN" -n "${NP:-2}" ${MPIRUN_ARGS:-} "${PYTHON:-python3}" -m tapdist train "$@"
