#!/usr/bin/env bash
# The model card's measurements: every shipped scale on val_hr (where recipes are chosen) and on the paper's
# benchmark sets (reported, never tuned on), by `refsr eval`; JSON into docs/eval/.
#
#   scripts/eval_release.sh                  # all of it
#   SETS="val_hr" SCALES="8" scripts/eval_release.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
WEIGHTS_DIR=${WEIGHTS_DIR:-weights}
SCALES=${SCALES:-8 4 2}
SETS=${SETS:-val_hr bench/Set5 bench/Set14}
mkdir -p docs/eval
# Each table and its JSON are written into a temporary folder and moved over the committed ones only when `refsr
# eval` succeeded: a failing or interrupted run leaves the docs as they were (eval writes its --json when some
# images fail, with the rest measured, and exits 1).
tmp=""
trap 'rm -rf "$tmp"' EXIT
for scale in $SCALES; do
    weights="$WEIGHTS_DIR/refsr-x$scale.safetensors"
    for set in $SETS; do
        name=$(basename "$set")
        tmp=$(mktemp -d "docs/eval/.x$scale-$name.XXXXXX")
        # Samples (from the shipped texture bank) and gallery references, by analogy: no trained branch needed.
        refsr eval "$DATA/$set" --scale "$scale" --weights "$weights" --samples 10 --ref "$DATA/refs" \
            --num-refs 10 --json "$tmp/table.json" > "$tmp/table.txt"
        mv "$tmp/table.json" "docs/eval/x$scale-$name.json" && mv "$tmp/table.txt" "docs/eval/x$scale-$name.txt"
        rmdir "$tmp"
        echo "x$scale $name: docs/eval/x$scale-$name.txt"
    done
done
