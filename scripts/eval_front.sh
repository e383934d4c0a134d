#!/usr/bin/env bash
# The texture analogy's front on the six 384-pixel centre crops of val_hr at 8x (where its defaults are chosen):
# samples' LPIPS-vgg (and LPIPS-alex, PSNR) against their diversity, over --strength at T = 1 and over
# --temperature at the default strength. JSON into docs/eval/analogy/; scripts/plot_curves.py draws it.
#
#   scripts/eval_front.sh
#   STRENGTHS="0.5" TEMPERATURES="" scripts/eval_front.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
STRENGTHS=${STRENGTHS:-0.25 0.5 0.75 1}
TEMPERATURES=${TEMPERATURES:-0.5 2 4}
crops=$(mktemp -d)
tmp=""
trap 'rm -rf "$crops" "$tmp"' EXIT
python - "$DATA/val_hr" "$crops" <<'PY'
import sys
from pathlib import Path
from refsr_cli.stages import validation_crops
for i, crop in enumerate(validation_crops(Path(sys.argv[1]), 384, 8)):
    crop.save(f"{sys.argv[2]}/{i}.png")
PY
mkdir -p docs/eval/analogy
# Each JSON is written into a temporary folder and moved over the committed one only when `refsr eval` succeeded:
# a failing or interrupted run leaves the docs as they were (eval writes its --json when some images fail).
point() {  # strength, temperature
    out="docs/eval/analogy/front-valcrops-x8-s$1-t$2.json"
    tmp=$(mktemp -d "docs/eval/analogy/.front.XXXXXX")
    refsr eval "$crops" --scale 8 --samples 10 --strength "$1" --sample-temperature "$2" --baseline bicubic \
        --json "$tmp/front.json" > /dev/null
    mv "$tmp/front.json" "$out" && rmdir "$tmp"
    echo "strength $1, temperature $2: $out"
}
for s in $STRENGTHS; do point "$s" 1; done
for t in $TEMPERATURES; do point 0.5 "$t"; done
