#!/usr/bin/env bash
# The fine-tuning protocol on SmolLM2-135M at CPU smoke scale: every model of the table, then its scores.
# Usage: bash run.sh WORK_DIR   (the venv's dynsparse on PATH; ~1 h on two CPU cores)
set -euo pipefail
W=${1:?work dir}; HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$W"
FT="--trainable ff --data shakespeare --seq-len 256 --batch-size 4 --max-steps ${STEPS:-40} --lr 3e-4
    --warmup-steps 4 --eval-every ${STEPS:-40} --eval-batches 4 --no-progress --no-tensorboard --json"
# trees: random (the published init) and distilled layer by layer on 8,192 calibration tokens
[ -d "$W/tree8x7_random" ] || dynsparse convert --model smollm2-135m --depth 7 --trees 8 --activation silu \
    --out "$W/tree8x7_random"
[ -d "$W/tree8x7" ] || dynsparse convert --model smollm2-135m --depth 7 --trees 8 --activation silu \
    --init distill --distill-lr 1e-2 --out "$W/tree8x7" | tee "$W/convert_tree8x7.log"
# the same fine-tuning (tokens, steps, optimizer, only the FF blocks train) for the dense model and the trees
[ -d "$W/dense_ft/final" ] || dynsparse train --init-from smollm2-135m $FT --out "$W/dense_ft" > "$W/dense_ft.json"
[ -d "$W/tree8x7_ft/final" ] || dynsparse train --init-from "$W/tree8x7" --ff tree $FT --out "$W/tree8x7_ft" \
    > "$W/tree8x7_ft.json"
[ -f "$W/narratives.txt" ] || python "$HERE/narratives.py" "$W/narratives.txt"
for m in smollm2-135m "$W/dense_ft/final" "$W/tree8x7_random" "$W/tree8x7" "$W/tree8x7_ft/final"; do
    tag=$(echo "$m" | sed "s#$W/##; s#/final##")
    ref="--reference smollm2-135m"; [ "$m" = smollm2-135m ] && ref="--no-kl"  # KL(original || model)
    [ -f "$W/eval_$tag.macbeth.json" ] || dynsparse eval "$m" --split test --seq-len 256 --max-windows 16 $ref \
        --json > "$W/eval_$tag.macbeth.json"
    [ -f "$W/eval_$tag.narratives.json" ] || dynsparse eval "$m" --data "$W/narratives.txt" --split test \
        --seq-len 256 --max-windows 16 $ref --json > "$W/eval_$tag.narratives.json"
done
# decode: dense and the fine-tuned tree model through the same compiled loop (run it alone: it is a timing)
dynsparse bench generate --model smollm2-135m --converted "$W/tree8x7_ft/final" --dtype fp32 --no-hf --json \
    > "$W/decode_fp32.json"
# QA: the suite of docs/results/bigbench_smollm2 (fetched there with dynsparse tasks fetch-bigbench)
S=bigbench_unit_conversion__unit_identification,bigbench_unit_conversion__si_conversion
S=$S,bigbench_unit_conversion__chained_conversion,bigbench_unit_conversion__different_systems
for m in "$W/dense_ft/final" "$W/tree8x7_ft/final"; do
    tag=$(echo "$m" | sed "s#$W/##; s#/final##")
    dynsparse eval "$m" --no-perplexity --tasks $S --limit 100 --batch-size 16 --json > "$W/qa_$tag.json"
    dynsparse eval "$m" --no-perplexity --tasks bigbench_similarities_abstraction --limit 40 --batch-size 16 --json \
        > "$W/qa_$tag.similarities.json"
done
