#!/usr/bin/env bash
# The calibration run of `--variant eva` on the synthetic Llama-shaped model (24 × 2048,
# as graft_bench.sh makes it): per run, the time of the forward passes and of the
# statistics (Gram matrices or their sketches) as the run reports them, their ratio (the
# baseline is the forward pass in the same process), the Gram memory, and the peak RSS.
#
#   benches/calibration_bench.sh [OUT_DIR]     (default /tmp/lora-graft-bench)
#   REPEAT=3 BATCHES=2 BATCH=8 SEQ=128 R=16 MEMORY_MB=1024 benches/calibration_bench.sh
#
# Prints each run and the medians. Outputs are deleted after each run.
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
OUT="${1:-/tmp/lora-graft-bench}"
REPEAT="${REPEAT:-3}"
TIME=/usr/bin/time
[ -x "$BIN" ] || { echo "missing $BIN (cargo build --release)" >&2; exit 1; }
[ -x "$TIME" ] || { echo "missing $TIME (apt-get install -y time)" >&2; exit 1; }

MODEL="$OUT/model.onnx"
if [ ! -f "$MODEL" ]; then
    python3 "$HERE/make_synthetic.py" "$OUT" --layers "${LAYERS:-24}" --hidden "${HIDDEN:-2048}" \
        --vocab "${VOCAB:-32000}" || exit 1
fi
WORK="$OUT/calibration"
mkdir -p "$WORK"
DATA="$WORK/calib.jsonl"
python3 - "$DATA" "${VOCAB:-32000}" <<'PY'
import json, random, sys
random.seed(0)
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        f.write(json.dumps({"input_ids": [random.randrange(int(sys.argv[2])) for _ in range(512)]}) + "\n")
PY
echo "machine: nproc $(nproc); model: $MODEL ($(du -m "$OUT/model.onnx.data" | cut -f1) MB data)"
echo "eva r ${R:-16}, ${BATCHES:-2} batches of ${BATCH:-8} x ${SEQ:-128}, --calibration-memory ${MEMORY_MB:-1024} MB"
RATIOS=(); RSS=(); FWD=(); STATS=()
for i in $(seq "$REPEAT"); do
    rm -f "$WORK"/out.*
    "$TIME" -v -o "$WORK/time.txt" "$BIN" "$MODEL" --variant eva -r "${R:-16}" \
        --calibration "$DATA" --calibration-batches "${BATCHES:-2}" --calibration-batch "${BATCH:-8}" \
        --calibration-seq "${SEQ:-128}" --calibration-memory "${MEMORY_MB:-1024}" \
        -o "$WORK/out.onnx" > "$WORK/run.log" 2>&1 || { cat "$WORK/run.log"; exit 1; }
    line="$(grep '^calibration:' "$WORK/run.log")"
    rss=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$WORK/time.txt")
    fwd=$(sed -E 's/.*forward ([0-9.]+) s.*/\1/' <<<"$line")
    st=$(sed -E 's/.*statistics ([0-9.]+) s.*/\1/' <<<"$line")
    ratio=$(sed -E 's/.*\(([0-9.]+)x the forward\).*/\1/' <<<"$line")
    echo "run $i: $line; peak RSS $rss MB"
    RATIOS+=("$ratio"); RSS+=("$rss"); FWD+=("$fwd"); STATS+=("$st")
    rm -f "$WORK"/out.*
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "median: forward $(median "${FWD[@]}") s, statistics $(median "${STATS[@]}") s, calibration/forward $(median "${RATIOS[@]}")x, peak RSS $(median "${RSS[@]}") MB"
