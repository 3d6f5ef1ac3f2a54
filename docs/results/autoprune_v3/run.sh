#!/usr/bin/env bash
# The v3 auto-pruning study: 4000-step runs, 3 seeds, every variant with and without a whitened tree input,
# depth 7 x 2 trees and depth 11 x 1 tree, then `dynsparse prune` on every final model.
# Usage: bash run.sh WORK_DIR   (the venv's dynsparse on PATH). Two workers, one thread each; on this
# machine's 2 cores it took the wall time the README gives.
set -euo pipefail
W=${1:?work dir}
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
common="--lrs 3e-3 --seeds 0,1,2 --max-steps 4000 --warmup-frac 0.05 --threads 1 --no-progress --prune"
worker() {  # $1: "" (plain) or "+whiten"
    local m=$1
    dynsparse study autoprune $common --out "$W/d7" --probe-every 200 --heldout-windows 32 \
        --variants node-gelu$m,node-relu$m,node-tanh$m,node-identity$m,path-gelu$m --depths 7 --trees 2 > /dev/null
    dynsparse study autoprune $common --out "$W/d11" --probe-every 400 --heldout-windows 64 \
        --variants node-gelu$m,path-gelu$m --depths 11 --trees 1 > /dev/null
}
worker "" & worker "+whiten" & wait
# the reports over every cell of each folder (all finished: nothing retrains)
dynsparse study autoprune $common --out "$W/d7" --probe-every 200 --heldout-windows 32 --depths 7 --trees 2 \
    --variants node-gelu,node-relu,node-tanh,node-identity,path-gelu,node-gelu+whiten,node-relu+whiten,node-tanh+whiten,node-identity+whiten,path-gelu+whiten > /dev/null
dynsparse study autoprune $common --out "$W/d11" --probe-every 400 --heldout-windows 64 --depths 11 --trees 1 \
    --variants node-gelu,path-gelu,node-gelu+whiten,path-gelu+whiten > /dev/null
