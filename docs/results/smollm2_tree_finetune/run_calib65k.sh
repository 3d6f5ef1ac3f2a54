#!/usr/bin/env bash
# Session 25: run.sh's 8x7 recipe (seed 0) with the calibration the distillation probe points to: 65,536 tokens
# in windows spread over the train split (convert's spreading is the default since session 25), then the same
# FF-only fine-tuning and the same perplexity evaluations.
# Usage: [SEED=1] bash run_calib65k.sh WORK_DIR   (the venv's dynsparse on PATH; ~35 min on two CPU cores, 6 GB)
set -euo pipefail
W=${1:?work dir}; HERE=$(cd "$(dirname "$0")" && pwd)
SEED=${SEED:-0}; T=tree8x7_c65k; [ "$SEED" = 0 ] || T=${T}_s$SEED
mkdir -p "$W"
. "$HERE/common.sh"
[ -d "$W/$T" ] || dynsparse convert --model smollm2-135m --depth 7 --trees 8 --activation silu \
    --init distill --distill-lr 1e-2 --calib-tokens 65536 --seed "$SEED" --out "$W/$T" | tee "$W/convert_$T.log"
[ -d "$W/${T}_ft/final" ] || dynsparse train --init-from "$W/$T" --ff tree --trainable ff --seed "$SEED" $FT \
    --out "$W/${T}_ft" > "$W/${T}_ft.json"
narratives
evals "$W/$T" "$W/${T}_ft/final"
