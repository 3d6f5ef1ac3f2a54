#!/usr/bin/env bash
# The QA suite 0-shot and 5-shot (common.sh's qa) for models in WORK_DIR, e.g. run_ft_sweep.sh's outputs.
# Usage: bash run_qa.sh WORK_DIR NAME...   (NAME: a model folder in WORK_DIR; its final/ when it is a run;
# the venv's dynsparse on PATH; one thread)
set -euo pipefail
W=${1:?work dir}; shift; HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
. "$HERE/common.sh"
for name in "${@:?model names}"; do
    m=$W/$name; [ -d "$m/final" ] && m=$m/final
    qa "$m" 0
    qa "$m" 5
done
