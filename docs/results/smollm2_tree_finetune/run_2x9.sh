#!/bin/bash
# issue 13's second tree shape: 2 trees of depth 9 (0.98 % active), the recipe of smollm2_tree_finetune/run.sh
set -euo pipefail
cd /work/main
export PATH=/work/main/.venv/bin:$PATH OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1
W=/work/runs/ft
FT="--trainable ff --data shakespeare --seq-len 256 --batch-size 4 --max-steps 40 --lr 3e-4
    --warmup-steps 4 --eval-every 40 --eval-batches 4 --no-progress --no-tensorboard --json"
date +%T
[ -d $W/tree2x9 ] || dynsparse convert --model smollm2-135m --depth 9 --trees 2 --activation silu \
    --init distill --distill-lr 1e-2 --out $W/tree2x9 > $W/convert_tree2x9.log 2>&1
date +%T
[ -d $W/tree2x9_ft/final ] || dynsparse train --init-from $W/tree2x9 --ff tree $FT --out $W/tree2x9_ft > $W/tree2x9_ft.json
date +%T
[ -f $W/narratives.txt ] || { dynsparse tasks fetch-bigbench --tasks abstract_narrative_understanding/4_distractors > /dev/null;
    python docs/results/smollm2_tree_finetune/narratives.py $W/narratives.txt; }
for m in $W/tree2x9 $W/tree2x9_ft/final; do
    tag=$(echo $m | sed "s#$W/##; s#/final##")
    dynsparse eval $m --split test --seq-len 256 --max-windows 16 --reference smollm2-135m --json > $W/eval_$tag.macbeth.json
    dynsparse eval $m --data $W/narratives.txt --split test --seq-len 256 --max-windows 16 --reference smollm2-135m \
        --json > $W/eval_$tag.narratives.json
done
date +%T
