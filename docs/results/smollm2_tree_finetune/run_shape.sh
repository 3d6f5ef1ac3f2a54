#!/usr/bin/env bash
# Session 28: does capacity at the same active share close the gap? run_calib65k.sh's distillation (65,536
# calibration tokens, dense inputs, 300 steps per layer at lr 1e-2) for another tree shape, then the best
# fine-tuning found so far (run_ft_sweep.sh's budget-tree: 160 steps at lr 1e-3, FF only) and the perplexity
# evaluations. 16x7 has twice 8x7's trees, and so twice its active units, at the same 3.14 % active share.
# Usage: [SHAPE=16x7] [SEED=0] bash run_shape.sh WORK_DIR   (the venv's dynsparse on PATH; one thread; ~1 h, 9 GB)
set -euo pipefail
W=${1:?work dir}; HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
SHAPE=${SHAPE:-16x7}; SEED=${SEED:-0}; T=tree${SHAPE}_c65k; [ "$SEED" = 0 ] || T=${T}_s$SEED
mkdir -p "$W"
. "$HERE/common.sh"
[ -d "$W/$T" ] || dynsparse convert --model smollm2-135m --trees "${SHAPE%x*}" --depth "${SHAPE#*x}" \
    --activation silu --init distill --distill-lr 1e-2 --calib-tokens 65536 --seed "$SEED" --out "$W/$T" \
    | tee "$W/convert_$T.log"
[ -d "$W/${T}_ft160/final" ] || dynsparse train --init-from "$W/$T" --ff tree --trainable ff --seed "$SEED" \
    $(ft_flags 160 1e-3 40) --out "$W/${T}_ft160" > "$W/${T}_ft160.json"
narratives
evals "$W/$T" "$W/${T}_ft160/final"
