#!/usr/bin/env bash
# Session 26: is the recipe's fine-tuning (40 steps at lr 3e-4, FF only) what keeps the trees far from dense?
# The 65k-calibration seed-0 trees (run_calib65k.sh's output in WORK_DIR) and the dense model, fine-tuned the same
# way at two more learning rates, each picked on the validation split; then both at 4x the tokens.
# Usage: bash run_ft_sweep.sh WORK_DIR PART   (PART: lr, budget-tree or budget-dense, the last two with LR set to
# that model's best rate from the lr part; or routing: the node usage of the random-init and distilled trees on
# 51,200 validation tokens; the venv's dynsparse on PATH; one thread each)
set -euo pipefail
W=${1:?work dir}; PART=${2:?lr, budget-tree, budget-dense or routing}; HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
. "$HERE/common.sh"
ft() {  # ft NAME INIT STEPS LR [train flags]: fine-tune FF only, then the perplexity evaluations
    local name=$1 init=$2 steps=$3 lr=$4; shift 4
    [ -d "$W/$name/final" ] || dynsparse train --init-from "$init" --trainable ff --seed 0 "$@" \
        $(ft_flags "$steps" "$lr" 40) --out "$W/$name" > "$W/$name.json"
    narratives
    evals "$W/$name/final"
}
case $PART in
lr)
    for lr in 1e-3 3e-3; do
        ft "tree8x7_c65k_ft_lr$lr" "$W/tree8x7_c65k" 40 "$lr" --ff tree
        ft "dense_ft_lr$lr" smollm2-135m 40 "$lr"
    done ;;
budget-tree) ft tree8x7_c65k_ft160 "$W/tree8x7_c65k" 160 "${LR:?}" --ff tree ;;
budget-dense) ft dense_ft160 smollm2-135m 160 "${LR:?}" ;;
routing)
    [ -d "$W/tree8x7_random" ] || dynsparse convert --model smollm2-135m --depth 7 --trees 8 --activation silu \
        --out "$W/tree8x7_random"
    for m in tree8x7_random tree8x7_c65k; do
        [ -f "$W/routing_$m.json" ] || dynsparse eval "$W/$m" --split val --seq-len 256 --max-windows 200 --json \
            > "$W/routing_$m.json"
    done ;;
*) echo "PART must be lr, budget-tree, budget-dense or routing, not $PART" >&2; exit 2 ;;
esac
