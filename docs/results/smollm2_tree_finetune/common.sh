# Shared by run_seeds.sh and run_calib65k.sh (sourced after W and HERE are set): the fine-tuning flags (no
# --trainable: each run names its own), the narratives corpus, and the perplexity evaluations.
FT="--data shakespeare --seq-len 256 --batch-size 4 --max-steps ${STEPS:-40} --lr 3e-4
    --warmup-steps 4 --eval-every ${STEPS:-40} --eval-batches 4 --no-progress --no-tensorboard --json"
narratives() {  # the second held-out corpus, built once from BIG-bench's abstract_narrative_understanding
    [ -f "$W/narratives.txt" ] || { dynsparse tasks fetch-bigbench \
        --tasks abstract_narrative_understanding/4_distractors > /dev/null; python "$HERE/narratives.py" "$W/narratives.txt"; }
}
evals() {  # perplexity on Macbeth and the narratives, KL to the original
    for m in "$@"; do
        tag=$(echo "$m" | sed "s#$W/##; s#/final##")
        [ -f "$W/eval_$tag.macbeth.json" ] || dynsparse eval "$m" --split test --seq-len 256 --max-windows 16 \
            --reference smollm2-135m --json > "$W/eval_$tag.macbeth.json"
        [ -f "$W/eval_$tag.narratives.json" ] || dynsparse eval "$m" --data "$W/narratives.txt" --split test \
            --seq-len 256 --max-windows 16 --reference smollm2-135m --json > "$W/eval_$tag.narratives.json"
    done
}
