#!/usr/bin/env bash
# Session 27: the sequential distillation that the dead-node study pointed to. run_calib65k.sh's recipe
# (65,536 calibration tokens, 300 steps per layer at lr 1e-2), but each tree fitted on the inputs it will see
# (`--distill-inputs sequential`: layer by layer, behind the trees already fitted), then fine-tuned like
# run_ft_sweep.sh's budget-tree part (160 steps at lr 1e-3, FF only) and the perplexity evaluations.
# QA: run_qa.sh WORK_DIR tree8x7_c65k_seq_ft160. START=balanced starts each fit from `--distill-start balanced`.
# Usage: [SEED=1] [START=balanced] bash run_sequential.sh WORK_DIR   (the venv's dynsparse on PATH; one thread;
# ~40 min)
set -euo pipefail
W=${1:?work dir}; HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
SEED=${SEED:-0}; START=${START:-random}; T=tree8x7_c65k_seq
[ "$START" = random ] || T=${T}_$START; [ "$SEED" = 0 ] || T=${T}_s$SEED
mkdir -p "$W"
. "$HERE/common.sh"
[ -d "$W/$T" ] || dynsparse convert --model smollm2-135m --depth 7 --trees 8 --activation silu \
    --init distill --distill-inputs sequential --distill-lr 1e-2 --calib-tokens 65536 --distill-start "$START" --seed "$SEED" \
    --out "$W/$T" | tee "$W/convert_$T.log"
[ -d "$W/${T}_ft160/final" ] || dynsparse train --init-from "$W/$T" --ff tree --trainable ff --seed "$SEED" \
    $(ft_flags 160 1e-3 40) --out "$W/${T}_ft160" > "$W/${T}_ft160.json"
narratives
evals "$W/$T" "$W/${T}_ft160/final"
