#!/usr/bin/env bash
# The learning-rate grid of the auto-pruning study: the v3 recipe (4000 steps, 5 % warm-up, 3 seeds, depth 7 x
# 2 trees) at peak learning rates 3e-4 and 1e-3, beside the v3 runs at 3e-3 (../autoprune_v3): every variant,
# plus node-gelu and node-relu with the whitened tree input. Then the report over the folder and `table.py`.
# Usage: bash run.sh WORK_DIR   (the venv's dynsparse on PATH). Two workers, one thread each.
set -euo pipefail
W=${1:?work dir}
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
common="--lrs 3e-4,1e-3 --seeds 0,1,2 --max-steps 4000 --warmup-frac 0.05 --threads 1 --no-progress --prune"
d7="--out $W/d7 --probe-every 200 --heldout-windows 32 --depths 7 --trees 2"
# disjoint cells per worker (a run another process is training is locked, not shared)
{ dynsparse study autoprune $common $d7 --variants node-gelu,node-relu,node-tanh > /dev/null
  dynsparse study autoprune $common $d7 --variants node-gelu+whiten --lrs 3e-4 > /dev/null; } &
{ dynsparse study autoprune $common $d7 --variants node-identity,path-gelu,node-relu+whiten > /dev/null
  dynsparse study autoprune $common $d7 --variants node-gelu+whiten --lrs 1e-3 > /dev/null; } &
wait
# the report over every cell (all finished: nothing retrains); --prune prunes the best learning rate's models
dynsparse study autoprune $common $d7 > /dev/null \
    --variants node-gelu,node-relu,node-tanh,node-identity,path-gelu,node-gelu+whiten,node-relu+whiten
