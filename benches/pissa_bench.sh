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
USAGE="pissa_bench.sh OUT_DIR"
# shellcheck source=rounds.sh
source "$HERE/rounds.sh"
echo "machine: nproc $(nproc); model: $MODEL ($(du -m "$DATA" | cut -f1) MB data); $ROUNDS rounds"

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
fast="$(echo "${TIMES[fast]}" | median)"
copy="$(echo "${TIMES[copy]}" | median)"
printf '%-6s %12s %14s %9s %9s\n' run "median s" "median RSS MB" "/ fast" "/ copy"
for n in copy fast exact ${BASE:+base}; do
    t="$(echo "${TIMES[$n]}" | median)"; r="$(echo "${PEAKS[$n]}" | median)"
    awk -v n="$n" -v t="$t" -v r="$r" -v f="$fast" -v c="$copy" \
        'BEGIN { printf "%-6s %12.2f %14d %9.2f %9.2f\n", n, t, r, t / f, t / c }'
done
