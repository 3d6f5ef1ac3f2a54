#!/usr/bin/env bash
# The from-scratch protocol at equal parameters: dense vs 2 trees of depth 7 (510 tree units against 512 dense
# FF units, 3.14 % active) on the built-in Shakespeare, tiny preset, 3000 steps of 16 x 128 tokens, the
# demo's per-model choices otherwise; one `dynsparse compare` per seed, two seeds at a time on one thread each.
# Usage: bash run.sh WORK_DIR [SEEDS]   (the venv's dynsparse on PATH; ~35 min per pair of seeds on 2 cores)
set -euo pipefail
W=${1:?work dir}; SEEDS=${2:-0 1 2}
mkdir -p "$W"
run() { dynsparse compare --trees 2 --depth 7 --max-steps 3000 --seed "$1" --threads 1 --no-progress \
            --out "$W/seed$1" > "$W/seed$1.log" 2>&1; }
set -- $SEEDS
while [ $# -gt 0 ]; do
    run "$1" & a=$!; b=
    if [ $# -gt 1 ]; then run "$2" & b=$!; fi
    wait $a; [ -z "$b" ] || wait $b
    shift; [ $# -gt 0 ] && shift
done
python "$(dirname "$0")/table.py" "$W" "$(dirname "$0")"
