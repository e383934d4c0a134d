#!/usr/bin/env bash
# Hashes of refsr's outputs for fixed inputs and seeds (every command, every texture, tiles, the sidecars, two
# training stages of two steps, eval's means): run it before and after a refactor and diff the two lists, which
# must be identical. A trained checkpoint is hashed by its tensors and sorted metadata (safetensors writes the
# metadata in no fixed order).
#
#   REFSR="python -m refsr_cli" scripts/output_hashes.sh /tmp/before > before.txt    # (PYTHONPATH=a checkout)
set -euo pipefail
REFSR=${REFSR:-refsr}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
G=${1:?give an empty work folder}
export OMP_NUM_THREADS=1
# Only a folder of its own is emptied (it leaves a mark in it): never one of the user's.
if [ -e "$G" ] && [ -n "$(ls -A "$G")" ] && [ ! -e "$G/.output_hashes" ]; then
    echo "output_hashes.sh: $G is not empty and not a work folder of this script; give a new or empty folder" >&2
    exit 2
fi
rm -rf "$G" && mkdir -p "$G" && cd "$G" && touch .output_hashes
python - "$ROOT" <<'PY'
import sys
import numpy as np
from PIL import Image
root = sys.argv[1]
Image.open(f"{root}/examples/seeding-lr.png").convert("RGB").crop((0, 0, 40, 32)).save("in.png")
Image.open(f"{root}/examples/dandelions-ref.jpg").convert("RGB").resize((96, 96)).save("ref.png")
for i in range(2):
    blocks = np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((128, 96), Image.NEAREST).save(f"photo{i}.png")
PY
mkdir photos && mv photo*.png photos/
$REFSR upscale in.png --scale 4 -o o -q
$REFSR upscale in.png --ref ref.png --scale 4 -o o -q
$REFSR upscale in.png --ref ref.png --texture learned --seed 3 --scale 4 -o o -q
$REFSR upscale in.png --ref ref.png --match --match-map --scale 4 -o o -q
$REFSR sample in.png --n 2 --seed 5 --scale 4 -o o -q
$REFSR sample in.png --n 2 --seed 5 --ref ref.png --strength 1 --scale 4 -o o -q
$REFSR sample in.png --n 3 --sheet --scale 4 -o o -q
$REFSR walk in.png --seed 1 --seed 2 --steps 3 --animate gif --scale 4 -o o -q
$REFSR upscale in.png --scale 2 --tile 16 --tile-pad 4 --consistency-steps 2 -o o -q
$REFSR train --data photos --out run-trunk --stage trunk --scales 2 --steps 2 --batch 2 --lr-patch 8 --device cpu -q
$REFSR train --data photos --out run-tex --init run-trunk/x2.safetensors --scale 2 --steps 2 --batch 2 --lr-patch 8 \
    --perceptual-crop 32 --pool-size 4 --imle-samples 2 --device cpu -q
$REFSR eval photos --scale 2 --weights run-tex/last.safetensors --samples 2 --json ev.json > /dev/null
python -c "import json; print(json.dumps(json.load(open('ev.json'))['means'], sort_keys=True))" > ev-means.txt
for f in o/* ev-means.txt; do echo "$(sha256sum < "$f" | cut -c1-16) $f"; done
python - run-*/*.safetensors <<'PY'
import hashlib, json, sys
from safetensors import safe_open
for path in sys.argv[1:]:
    digest = hashlib.sha256()
    with safe_open(path, "pt") as f:
        digest.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for key in sorted(f.keys()):
            digest.update(key.encode() + f.get_tensor(key).numpy().tobytes())
    print(digest.hexdigest()[:16], path)
PY
