#!/usr/bin/env bash
# Jobs that rewrite every targeted weight, against a plain copy of the model's data file
# (the bytes they must write), in alternating rounds; medians of ROUNDS (default 3):
#   merge  `merge` of a LoRA r 16 adapter (its B random, so the merge changes every weight)
#   serve  PiSSA served on W_res (`--adapter-inputs --pissa-niter 4`, r 16)
# Outputs beside the input.
#
#   benches/write_bench.sh OUT_DIR            (a model.onnx + model.onnx.data in it;
#                                              made by make_synthetic.py if absent)
#   BASE=/path/to/older/lora-graft benches/write_bench.sh OUT_DIR   (adds its runs,
#                                              "merge-base" and "serve-base", to the rounds)
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
OUT="${1:?usage: write_bench.sh OUT_DIR}"
ROUNDS="${ROUNDS:-3}"
BASE="${BASE:-}"
TIME=/usr/bin/time
[ -x "$BIN" ] || { echo "missing $BIN (build it with cargo build --release)" >&2; exit 1; }
[ -x "$TIME" ] || { echo "missing $TIME (apt-get install -y time)" >&2; exit 1; }
[ -z "$BASE" ] || [ -x "$BASE" ] || { echo "BASE=$BASE is not an executable" >&2; exit 1; }

MODEL="$OUT/model.onnx"
DATA="$OUT/model.onnx.data"
if [ ! -f "$MODEL" ] || [ ! -f "$DATA" ]; then
    python3 "$HERE/make_synthetic.py" "$OUT" --layers "${LAYERS:-24}" --hidden "${HIDDEN:-2048}" \
        --vocab "${VOCAB:-32000}" --spectrum "${SPECTRUM:-flat}" || exit 1
fi
# The adapter: a LoRA graft's file with every lora_B set to small random values.
ADAPTER="$OUT/bench-lora.safetensors"
if [ ! -f "$ADAPTER" ]; then
    "$BIN" "$MODEL" --variant lora -r 16 -o "$OUT/bench-lora.onnx" > /dev/null || exit 1
    rm -f "$OUT"/bench-lora.onnx*
    python3 - "$ADAPTER" <<'EOF' || exit 1
import json, random, struct, sys
path = sys.argv[1]
raw = open(path, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8 : 8 + n])
data = bytearray(raw[8 + n :])
rng = random.Random(0)
for key, t in header.items():
    if key.endswith("lora_B") and t["dtype"] == "F32":
        s, e = t["data_offsets"]
        data[s:e] = struct.pack(f"<{(e - s) // 4}f", *(rng.gauss(0, 0.01) for _ in range((e - s) // 4)))
open(path, "wb").write(raw[: 8 + n] + bytes(data))
EOF
fi
echo "machine: nproc $(nproc); model: $MODEL ($(du -m "$DATA" | cut -f1) MB data); $ROUNDS rounds"

declare -A TIMES PEAKS
# run NAME CMD...: wall seconds and peak RSS appended to TIMES[NAME], PEAKS[NAME]
run() {
    local name="$1"; shift
    cat "$DATA" > /dev/null
    "$TIME" -f "%e %M" -o "$OUT/time.txt" "$@" > "$OUT/$name.log" 2>&1 \
        || { echo "$name failed; see $OUT/$name.log" >&2; exit 1; }
    read -r wall kb < "$OUT/time.txt"
    TIMES[$name]+="$wall "
    PEAKS[$name]+="$((kb / 1024)) "
    echo "  $name: $wall s, $((kb / 1024)) MB" >&2
}
both() {
    local name="$1" bin="$2"
    run "merge$name" "$bin" merge "$MODEL" "$ADAPTER" -o "$OUT/out.merge.onnx"
    rm -f "$OUT"/out.merge.*
    run "serve$name" "$bin" "$MODEL" --variant pissa -r 16 --pissa-niter 4 --adapter-inputs \
        -o "$OUT/out.serve.onnx"
    rm -f "$OUT"/out.serve.*
}
for round in $(seq "$ROUNDS"); do
    echo "round $round" >&2
    run copy cp "$DATA" "$OUT/copy.data"
    rm -f "$OUT/copy.data"
    both "" "$BIN"
    [ -z "$BASE" ] || both "-base" "$BASE"
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
copy="$(echo "${TIMES[copy]}" | median)"
printf '%-11s %12s %14s %9s\n' run "median s" "median RSS MB" "/ copy"
for n in copy merge serve ${BASE:+merge-base serve-base}; do
    t="$(echo "${TIMES[$n]}" | median)"; r="$(echo "${PEAKS[$n]}" | median)"
    awk -v n="$n" -v t="$t" -v r="$r" -v c="$copy" \
        'BEGIN { printf "%-11s %12.2f %14d %9.2f\n", n, t, r, t / c }'
done
