#!/usr/bin/env bash
# `upscale --match` measured under the three protocols of docs/evaluation.md (warp, half, unrelated) with the shipped
# weights, against their output without a reference; JSON and tables into docs/eval/match/.
#
#   scripts/eval_match.sh                                      # all of it
#   SETS="val_hr" SCALES="4" PROTOCOLS="warp" scripts/eval_match.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
SCALES=${SCALES:-4 8}
SETS=${SETS:-val_hr bench/Set5 bench/Set14}
PROTOCOLS=${PROTOCOLS:-warp half unrelated}
mkdir -p docs/eval/match
# Each table and its JSON are written into a temporary folder and moved over the committed ones only when `refsr
# eval` succeeded: a failing or interrupted run leaves the docs as they were (eval writes its --json when some
# images fail, with the rest measured, and exits 1).
tmp=""
trap 'rm -rf "$tmp"' EXIT
for scale in $SCALES; do
    for set in $SETS; do
        name=$(basename "$set")
        for protocol in $PROTOCOLS; do
            out="docs/eval/match/x$scale-$name-$protocol"
            tmp=$(mktemp -d "docs/eval/match/.x$scale-$name-$protocol.XXXXXX")
            refsr eval "$DATA/$set" --scale "$scale" --match-protocol "$protocol" --baseline none \
                --json "$tmp/table.json" > "$tmp/table.txt"
            mv "$tmp/table.json" "$out.json" && mv "$tmp/table.txt" "$out.txt" && rmdir "$tmp"
            echo "x$scale $name $protocol: $(tail -1 "$out.txt")"
        done
    done
done
