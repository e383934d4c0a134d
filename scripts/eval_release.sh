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
# Each table is written to a temporary file and moved over the committed one only when `refsr eval` succeeded: a
# failing or interrupted run leaves the docs as they were (`--json` is itself written atomically).
tmp=""
trap 'rm -f "$tmp"' EXIT
for scale in $SCALES; do
    weights="$WEIGHTS_DIR/refsr-x$scale.safetensors"
    for set in $SETS; do
        name=$(basename "$set")
        tmp=$(mktemp "docs/eval/.x$scale-$name.XXXXXX")
        # Samples (from the shipped texture bank) and gallery references, by analogy: no trained branch needed.
        refsr eval "$DATA/$set" --scale "$scale" --weights "$weights" --samples 10 --ref "$DATA/refs" \
            --num-refs 10 --json "docs/eval/x$scale-$name.json" --overwrite > "$tmp"
        mv "$tmp" "docs/eval/x$scale-$name.txt"
        echo "x$scale $name: docs/eval/x$scale-$name.txt"
    done
done
