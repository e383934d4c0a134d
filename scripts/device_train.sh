#!/usr/bin/env bash
# The texture stage on a lent GPU machine, as one call of the device tool: install, train for MINUTES, bring the run
# folder back. The machine starts bare and cannot reach ../shared, so first, here:
#
#   mkdir -p data && cp -r ../shared/data/train_hr ../shared/data/refs ../shared/data/val_hr data/   # git-ignored
#
# then call the device tool's run with carry ["data", "runs/<the run to continue>"] (64 MiB in all: the three
# folders are about 49 MiB) and the command
#
#   SCALE=8 MINUTES=8 INIT=weights/refsr-x8.safetensors scripts/device_train.sh
#
# RESUME=runs/NAME continues that run folder instead (carry it). What comes back under $OUT: last.safetensors,
# last.state.safetensors and log.jsonl of the run (each under 16 MiB), and the console log.
set -uo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-8}
MINUTES=${MINUTES:-8}
STEPS=${STEPS:-3000}
BATCH=${BATCH:-32}
IMLE_SAMPLES=${IMLE_SAMPLES:-16}
case $SCALE in 8) patch=24 ;; 4) patch=48 ;; *) patch=96 ;; esac
python3 -m pip install -q -c constraints.txt . 2>&1 | tail -2 || python3 -m pip install -q . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -n "${RESUME:-}" ]; then
    run=$RESUME
    args=(--resume)
else
    run=runs/gpu-x$SCALE
    args=(--init "${INIT:-weights/refsr-x$SCALE.safetensors}")
fi
# A run stopped by the timeout keeps its last checkpoint (every 25 steps): --resume continues it in the next call.
timeout "$((MINUTES * 60))" refsr train --stage texture --scale "$SCALE" --data data/train_hr --refs data/refs \
    --val data/val_hr --steps "$STEPS" --batch "$BATCH" --lr-patch "$patch" --learning-rate 2e-4 \
    --modulation-lr-scale 10 --imle-samples "$IMLE_SAMPLES" --val-every 250 --save-every 25 --device cuda \
    --out "$run" -q "${args[@]}" 2>&1 | tee "${OUT:-/tmp}/train.log"
for f in last.safetensors last.state.safetensors log.jsonl; do
    [ -f "$run/$f" ] && cp "$run/$f" "${OUT:-/tmp}/"
done
tail -3 "$run/log.jsonl"
