# Shared by run_seeds.sh, run_calib65k.sh and run_ft_sweep.sh (sourced after W and HERE are set): the
# fine-tuning flags (no --trainable: each run names its own), the narratives corpus, the perplexity evaluations
# and the QA suite.
ft_flags() {  # ft_flags STEPS LR EVAL_EVERY
    echo "--data shakespeare --seq-len 256 --batch-size 4 --max-steps $1 --lr $2 --warmup-steps 4
          --eval-every $3 --eval-batches 4 --no-progress --no-tensorboard --json"
}
FT=$(ft_flags "${STEPS:-40}" 3e-4 "${STEPS:-40}")
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
QA_UNITS=bigbench_unit_conversion__unit_identification,bigbench_unit_conversion__si_conversion
QA_UNITS=$QA_UNITS,bigbench_unit_conversion__chained_conversion,bigbench_unit_conversion__different_systems
qa() {  # qa MODEL SHOTS: docs/results/bigbench_smollm2's suite, 100 documents a task (similarities_abstraction: 40)
    local m=$1 shots=$2 tag
    tag=$(echo "$m" | sed "s#$W/##; s#/final##"); [ "$shots" = 0 ] || tag=${tag}_${shots}shot
    dynsparse tasks fetch-bigbench --tasks unit_conversion/unit_identification,unit_conversion/si_conversion,\
unit_conversion/chained_conversion,unit_conversion/different_systems,similarities_abstraction > /dev/null
    qa_run "$m" "$shots" "$QA_UNITS" 100 "$W/qa_$tag.json"
    qa_run "$m" "$shots" bigbench_similarities_abstraction 40 "$W/qa_$tag.similarities.json"
}
qa_run() {  # qa_run MODEL SHOTS TASKS LIMIT OUT: skipped when OUT exists; written whole or not at all
    [ -f "$5" ] || { dynsparse eval "$1" --no-perplexity --tasks "$3" --limit "$4" --num-fewshot "$2" \
        --batch-size 16 --json > "$5.tmp" && mv "$5.tmp" "$5"; }
}
