#!/usr/bin/env bash
# Serving adapters: (1) `--adapter-inputs` graft wall time and peak RSS beside the plain
# LoRA graft on the graft benchmark's model (24 layers x 2048, benches/make_synthetic.py;
# r 16 on every reader and writer: 168 targets), the two taking turns REPEAT times
# (default 5), medians and their ratio; (2) `export-adapter` of that 168-target r 16
# adapter to an .onnx_adapter (median of REPEAT); (3) ONNX Runtime latency of the
# training benchmark's model (4 x 512, benches/make_train_bench_model.py) grafted with
# --adapter-inputs (r 8 on every linear but the head), no adapter and an adapter active,
# and the same adapter grafted (unmerged) and merged, against the base model, batch
# 1 x 128 and 8 x 128 (benches/serving_latency.py).
#
#   benches/serving_bench.sh [GRAFT_DIR] [TRAIN_DIR]
#   (defaults /tmp/lora-graft-bench, /tmp/lora-graft-train-bench; made if absent, the
#   second needs torch + transformers in PYTHON)
#   REPEAT=5 PYTHON=/path/to/venv/python ORT_PYTHON=target/py-venv/bin/python benches/serving_bench.sh
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
GRAFT_DIR="${1:-/tmp/lora-graft-bench}"
TRAIN_DIR="${2:-/tmp/lora-graft-train-bench}"
PYTHON="${PYTHON:-python3}"
ORT_PYTHON="${ORT_PYTHON:-$ROOT/target/py-venv/bin/python}"
REPEAT="${REPEAT:-5}"
TIME=/usr/bin/time
[ -x "$BIN" ] || { echo "missing $BIN (cargo build --release)" >&2; exit 1; }
[ -x "$TIME" ] || { echo "missing $TIME (apt-get install -y time)" >&2; exit 1; }

[ -f "$GRAFT_DIR/model.onnx" ] || "$PYTHON" "$HERE/make_synthetic.py" "$GRAFT_DIR" --layers 24 --hidden 2048 --vocab 32000 || exit 1
[ -f "$TRAIN_DIR/model.onnx" ] || "$PYTHON" "$HERE/make_train_bench_model.py" "$TRAIN_DIR" || exit 1
WORK="$GRAFT_DIR/serving-logs"
rm -rf "$WORK" && mkdir -p "$WORK"
cp "$BIN" "$WORK/lora-graft"   # a rebuild during the run does not matter
LG="$WORK/lora-graft"
echo "machine: nproc $(nproc); binary: $BIN ($(stat -c '%y' "$BIN" | cut -d. -f1)); $REPEAT runs each"

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
wall_s() { awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.3f\n", s }' "$1"; }
rss_mb() { awk -F': ' '/Maximum resident set size/ { printf "%.0f\n", $2 / 1024 }' "$1"; }

# timed NAME CMD...: appends wall seconds and peak RSS MB to $WORK/NAME.{wall,rss}
timed() {
    local name="$1"; shift
    "$TIME" -v -o "$WORK/t" "$@" > "$WORK/$name.log" 2>&1 || { echo "$name failed:"; tail -3 "$WORK/$name.log"; exit 1; }
    wall_s "$WORK/t" >> "$WORK/$name.wall"
    rss_mb "$WORK/t" >> "$WORK/$name.rss"
}

cat "$GRAFT_DIR/model.onnx.data" > /dev/null
for i in $(seq "$REPEAT"); do
    # Outputs beside the input, as the main job writes them (no data file copy).
    timed lora "$LG" "$GRAFT_DIR/model.onnx" --variant lora -r 16 -o "$GRAFT_DIR/bench-lora.onnx" --adapter "$WORK/lora.safetensors"
    rm -f "$GRAFT_DIR"/bench-lora.onnx*
    timed inputs "$LG" "$GRAFT_DIR/model.onnx" --variant lora -r 16 --adapter-inputs -o "$GRAFT_DIR/bench-inputs.onnx" --adapter "$WORK/inputs.safetensors"
    [ "$i" = "$REPEAT" ] || rm -f "$GRAFT_DIR"/bench-inputs.onnx*
done
for i in $(seq "$REPEAT"); do
    timed export "$LG" export-adapter "$WORK/inputs.safetensors" --model "$GRAFT_DIR/bench-inputs.onnx" -o "$WORK/a.onnx_adapter"
    rm -f "$WORK/a.onnx_adapter"
done
L=$(median < "$WORK/lora.wall"); I=$(median < "$WORK/inputs.wall"); E=$(median < "$WORK/export.wall")
LR=$(median < "$WORK/lora.rss"); IR=$(median < "$WORK/inputs.rss"); ER=$(median < "$WORK/export.rss")
echo
echo "graft, 24 x 2048 model, r 16 (medians of $REPEAT, turns taken)"
printf "  %-22s %8.3f s  %6d MB\n" "lora" "$L" "$LR"
printf "  %-22s %8.3f s  %6d MB   %.2fx lora's time\n" "lora --adapter-inputs" "$I" "$IR" "$(echo "$I / $L" | bc -l)"
printf "  %-22s %8.3f s  %6d MB   (%s)\n" "export-adapter" "$E" "$ER" "$(grep -o '^[0-9]* adapter inputs' "$WORK/export.log")"

# ONNX Runtime latency on the training benchmark's model.
mkdir -p "$WORK/latency"
"$LG" "$TRAIN_DIR/model.onnx" --variant lora -r 8 --target-roles reader,writer,inner --adapter-inputs -o "$WORK/latency/served.onnx" > /dev/null || exit 1
"$LG" export-adapter "$WORK/latency/served.safetensors" --model "$WORK/latency/served.onnx" -o "$WORK/latency/a.onnx_adapter" > /dev/null || exit 1
"$LG" "$TRAIN_DIR/model.onnx" --variant lora -r 8 --target-roles reader,writer,inner -o "$WORK/latency/unmerged.onnx" > /dev/null || exit 1
"$LG" merge "$TRAIN_DIR/model.onnx" "$WORK/latency/unmerged.safetensors" -o "$WORK/latency/merged.onnx" > /dev/null || exit 1
rm -f "$GRAFT_DIR"/bench-inputs.onnx*
for batch in 1 8; do
    echo
    "$ORT_PYTHON" "$HERE/serving_latency.py" "$TRAIN_DIR/model.onnx" "$WORK/latency/served.onnx" "$WORK/latency/a.onnx_adapter" \
        --unmerged "$WORK/latency/unmerged.onnx" --merged "$WORK/latency/merged.onnx" --batch "$batch" --seq 128
done
