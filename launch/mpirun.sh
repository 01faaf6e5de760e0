#!/usr/bin/env bash
# Launch `tapdist train` with mpirun/mpiexec (MPICH or Open MPI).
#
#   launch/mpirun.sh CONFIG [--set section.key=value ...] [--run-dir DIR | --resume DIR]
#
# Environment knobs (defaults in brackets):
#   NP           number of ranks [2]
#   MPIRUN       the MPI launcher [the mpiexec beside PYTHON, else mpirun, else mpiexec on PATH]
#   MPIRUN_ARGS  extra launcher flags, e.g. a hostfile [""]
#   PYTHON       interpreter with tapdist and mpi4py installed [python3]
# The launcher must belong to the MPI that mpi4py was built against: `pip install
# 'tapdist[mpi-wheel]'` puts MPICH's mpiexec beside the venv's python, which is why that one
# comes first. Collectives use gloo/NCCL after an mpi4py rendezvous; add
# `--set dist.backend=mpi` to move the parameters with MPI Allreduce instead.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    sed -n '2,/^set -/{/^#/p;}' "$0" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
beside=$(dirname "$(command -v "$PYTHON" || echo .)")/mpiexec
if [[ -z ${MPIRUN:-} ]]; then
    MPIRUN=$(command -v "$beside" || command -v mpirun || command -v mpiexec || true)
fi
if [[ -z $MPIRUN ]]; then
    echo "launch/mpirun.sh: no mpirun or mpiexec found (beside $PYTHON or on PATH); install" \
         "an MPI, or pip install 'tapdist[mpi-wheel]', or set MPIRUN" >&2
    exit 2
fi
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of flags
exec "$MPIRUN" -n "${NP:-2}" ${MPIRUN_ARGS:-} "$PYTHON" -m tapdist train "$@"
