#!/bin/bash
# Issue 13's seed and --trainable checks, the recipe of run.sh at one thread: a second seed of the 8x7 trees
# (conversion and fine-tuning), and the fine-tuning with everything trainable for the dense model and the trees.
# Usage: bash run_seeds.sh WORK_DIR   (the venv's dynsparse on PATH; ~2 h on one CPU core)
set -euo pipefail
W=${1:?work dir}; HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
mkdir -p "$W"
. "$HERE/common.sh"
narratives
date +%T
[ -d "$W/tree8x7_s1" ] || dynsparse convert --model smollm2-135m --depth 7 --trees 8 --activation silu \
    --init distill --distill-lr 1e-2 --seed 1 --out "$W/tree8x7_s1" > "$W/convert_tree8x7_s1.log"
date +%T
[ -d "$W/tree8x7_s1_ft/final" ] || dynsparse train --init-from "$W/tree8x7_s1" --ff tree --trainable ff --seed 1 $FT \
    --out "$W/tree8x7_s1_ft" > "$W/tree8x7_s1_ft.json"
date +%T
evals "$W/tree8x7_s1" "$W/tree8x7_s1_ft/final"
date +%T
[ -d "$W/dense_ft_all/final" ] || dynsparse train --init-from smollm2-135m --trainable all $FT \
    --out "$W/dense_ft_all" > "$W/dense_ft_all.json"
date +%T
evals "$W/dense_ft_all/final"
[ -d "$W/tree8x7_s1_ft_all/final" ] || dynsparse train --init-from "$W/tree8x7_s1" --ff tree --trainable all --seed 1 \
    $FT --out "$W/tree8x7_s1_ft_all" > "$W/tree8x7_s1_ft_all.json"
date +%T
evals "$W/tree8x7_s1_ft_all/final"
date +%T
# QA (0-shot) of the all-trainable models: run.sh's suite
for m in "$W/dense_ft_all/final" "$W/tree8x7_s1_ft_all/final"; do qa "$m" 0; done
date +%T
