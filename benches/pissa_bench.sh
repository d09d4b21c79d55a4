#!/usr/bin/env bash
# Exact PiSSA (certified Krylov top-r SVD) against the fast path (--pissa-niter 4) and a
# plain copy of the model's data file (the bytes a graft must at least read), in
# alternating rounds; medians of ROUNDS (default 3) runs each. r 16, output beside the
# input.
#
#   benches/pissa_bench.sh OUT_DIR            (a model.onnx + model.onnx.data in it;
#                                              made by make_synthetic.py if absent)
#   SPECTRUM=decaying LAYERS=4 benches/pissa_bench.sh /tmp/lg_decay
#   BASE=/path/to/older/lora-graft benches/pissa_bench.sh OUT_DIR   (adds its exact PiSSA,
#                                              "base", to the same rounds)
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
OUT="${1:?usage: pissa_bench.sh OUT_DIR}"
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
for round in $(seq "$ROUNDS"); do
    echo "round $round" >&2
    run copy cp "$DATA" "$OUT/copy.data"
    rm -f "$OUT/copy.data"
    run fast "$BIN" "$MODEL" --variant pissa -r 16 --pissa-niter 4 -o "$OUT/out.fast.onnx"
    rm -f "$OUT"/out.fast.*
    run exact "$BIN" "$MODEL" --variant pissa -r 16 -o "$OUT/out.exact.onnx"
    rm -f "$OUT"/out.exact.*
    if [ -n "$BASE" ]; then
        run base "$BASE" "$MODEL" --variant pissa -r 16 -o "$OUT/out.base.onnx"
        rm -f "$OUT"/out.base.*
    fi
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
fast="$(echo "${TIMES[fast]}" | median)"
copy="$(echo "${TIMES[copy]}" | median)"
printf '%-6s %12s %14s %9s %9s\n' run "median s" "median RSS MB" "/ fast" "/ copy"
for n in copy fast exact ${BASE:+base}; do
    t="$(echo "${TIMES[$n]}" | median)"; r="$(echo "${PEAKS[$n]}" | median)"
    awk -v n="$n" -v t="$t" -v r="$r" -v f="$fast" -v c="$copy" \
        'BEGIN { printf "%-6s %12.2f %14d %9.2f %9.2f\n", n, t, r, t / f, t / c }'
done
