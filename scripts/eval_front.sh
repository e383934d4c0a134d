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
trap 'rm -rf "$crops"' EXIT
python - "$DATA/val_hr" "$crops" <<'PY'
import sys
from pathlib import Path
from refsr_cli.train import validation_crops
for i, crop in enumerate(validation_crops(Path(sys.argv[1]), 384, 8)):
    crop.save(f"{sys.argv[2]}/{i}.png")
PY
mkdir -p docs/eval/analogy
point() {  # strength, temperature
    refsr eval "$crops" --scale 8 --samples 10 --strength "$1" --sample-temperature "$2" --baseline bicubic \
        --json "docs/eval/analogy/front-valcrops-x8-s$1-t$2.json" --overwrite > /dev/null
    echo "strength $1, temperature $2: docs/eval/analogy/front-valcrops-x8-s$1-t$2.json"
}
for s in $STRENGTHS; do point "$s" 1; done
for t in $TEMPERATURES; do point 0.5 "$t"; done
