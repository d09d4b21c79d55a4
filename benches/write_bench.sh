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
USAGE="write_bench.sh OUT_DIR"
# shellcheck source=rounds.sh
source "$HERE/rounds.sh"
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
copy="$(echo "${TIMES[copy]}" | median)"
printf '%-11s %12s %14s %9s\n' run "median s" "median RSS MB" "/ copy"
for n in copy merge serve ${BASE:+merge-base serve-base}; do
    t="$(echo "${TIMES[$n]}" | median)"; r="$(echo "${PEAKS[$n]}" | median)"
    awk -v n="$n" -v t="$t" -v r="$r" -v c="$copy" \
        'BEGIN { printf "%-11s %12.2f %14d %9.2f\n", n, t, r, t / c }'
done
