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
for scale in $SCALES; do
    weights="$WEIGHTS_DIR/refsr-x$scale.safetensors"
    textured=$(python - "$weights" <<'EOF'
import sys
from refsr_cli.checkpoint import read_metadata
print("no" if read_metadata(sys.argv[1]).get("stage") == "trunk" else "yes")
EOF
)
    for set in $SETS; do
        name=$(basename "$set")
        extra=()
        # Samples and references only where the texture branch is trained; T = 0 is the trunk alone.
        [ "$textured" = yes ] && extra=(--samples 10 --ref "$DATA/refs" --num-refs 10)
        refsr eval "$DATA/$set" --scale "$scale" --weights "$weights" "${extra[@]}" \
            --json "docs/eval/x$scale-$name.json" > "docs/eval/x$scale-$name.txt"
        echo "x$scale $name: docs/eval/x$scale-$name.txt"
    done
done
