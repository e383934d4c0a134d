#!/bin/sh
# Upscale every image of a folder with one reference, then draw 3 prior samples of each, in two calls
# (one model load each). refsr exits 1 when some files failed and says which; the rest are still written.
# Re-running skips what is already done, so an interrupted batch resumes.
#   sh examples/batch.sh IN_DIR OUT_DIR [REFERENCE]
set -u
in=${1:?usage: batch.sh IN_DIR OUT_DIR [REFERENCE]}
out=${2:?usage: batch.sh IN_DIR OUT_DIR [REFERENCE]}
ref=${3:-examples/painting.jpg}

mkdir -p "$out" && refsr upscale "$in" --ref "$ref" --scale 8 -o "$out" --skip-existing --json >> "$out/upscale.jsonl"
status=$?
refsr sample "$in" --n 3 --seed 0 --scale 8 -o "$out" --skip-existing --quiet || status=1
[ "$status" -eq 0 ] || echo "batch.sh: some files failed (see the messages above)" >&2
exit "$status"
