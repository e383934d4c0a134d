#!/usr/bin/env bash
# The release recipe end to end: the fidelity trunk of x2/x4/x8, then the texture branch of each scale on it.
#
#   scripts/train_release.sh                              # on this machine (CPU: hours; see weights/README.md)
#   DEVICE=cuda BATCH=32 TEXTURE_BATCH=32 IMLE_SAMPLES=16 scripts/train_release.sh   # one GPU
#
# DATA holds train_hr/, refs/ and val_hr/ (copy ../shared/data there for a device machine: /data/ is git-ignored);
# OUT receives runs/ and the finished refsr-x{2,4,8}.safetensors. INIT_TRUNK (a trunk checkpoint, e.g.
# weights/refsr-x8.safetensors) continues the trunk instead of starting it fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/release}
DEVICE=${DEVICE:-cpu}
TRUNK_STEPS=${TRUNK_STEPS:-5000}
TEXTURE_STEPS=${TEXTURE_STEPS:-3000}
BATCH=${BATCH:-8}
TEXTURE_BATCH=${TEXTURE_BATCH:-8}
IMLE_SAMPLES=${IMLE_SAMPLES:-8}
SCALES=${SCALES:-8 4 2}
mkdir -p "$OUT"

trunk_init=()
[ -n "${INIT_TRUNK:-}" ] && trunk_init=(--init "$INIT_TRUNK")
refsr train --stage trunk --scales 2,4,8 --data "$DATA/train_hr" --val "$DATA/val_hr" --steps "$TRUNK_STEPS" \
    --batch "$BATCH" --lr-patch 40 --learning-rate 2e-4 --val-every 500 --save-every 250 --device "$DEVICE" \
    "${trunk_init[@]}" --out "$OUT/trunk" -q

for scale in $SCALES; do
    # LR crops: 24 px at x8 (HR 192), 48 at x4 (HR 192), 96 at x2 (HR 192). The texture stage: IMLE over 8 latents
    # per crop, half the batch also decoded from a reference (another crop of the photo, or a gallery image).
    case $scale in 8) patch=24 ;; 4) patch=48 ;; *) patch=96 ;; esac
    refsr train --stage texture --init "$OUT/trunk/x$scale.safetensors" --scale "$scale" \
        --data "$DATA/train_hr" --refs "$DATA/refs" --val "$DATA/val_hr" --steps "$TEXTURE_STEPS" \
        --batch "$TEXTURE_BATCH" --lr-patch "$patch" --learning-rate 2e-4 --modulation-lr-scale 10 \
        --imle-samples "$IMLE_SAMPLES" --val-every 250 --save-every 50 --device "$DEVICE" \
        --out "$OUT/texture-x$scale" -q
    # Copied beside it, then renamed: with OUT=weights, a kill or a full disk mid-copy left the committed weights
    # truncated.
    tmp="$OUT/.refsr-x$scale.safetensors.tmp"
    cp "$OUT/texture-x$scale/last.safetensors" "$tmp" || { rm -f "$tmp"; exit 1; }
    mv -f "$tmp" "$OUT/refsr-x$scale.safetensors"
done
