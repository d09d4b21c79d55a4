#!/usr/bin/env bash
# Time lora-graft (lora, delora, pissa exact, pissa --pissa-niter 4; all r 16) against a
# Python onnx load + save_model(external data) baseline, on a synthetic Llama-shaped model.
#
#   benches/graft_bench.sh [OUT_DIR]          (default /tmp/lora-graft-bench)
#   LAYERS=2 HIDDEN=256 benches/graft_bench.sh /tmp/lg_small
#
# Generates OUT_DIR/model.onnx(+.data) with make_synthetic.py if absent (LAYERS, HIDDEN,
# VOCAB env vars pass through). Each run once, after one warm-up read of the data file;
# page cache is not dropped. Outputs are deleted after each run. A lora-graft run is
# stopped after TIMEOUT seconds (default 900). If the binary changes during a run, the
# run is repeated (up to 2 times).
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
OUT="${1:-/tmp/lora-graft-bench}"
TIMEOUT="${TIMEOUT:-900}"
TIME=/usr/bin/time

[ -x "$BIN" ] || { echo "missing $BIN (build it with cargo build --release)" >&2; exit 1; }
[ -x "$TIME" ] || { echo "missing $TIME (apt-get install -y time)" >&2; exit 1; }

MODEL="$OUT/model.onnx"
DATA="$OUT/model.onnx.data"
if [ ! -f "$MODEL" ] || [ ! -f "$DATA" ]; then
    python3 "$HERE/make_synthetic.py" "$OUT" --layers "${LAYERS:-24}" --hidden "${HIDDEN:-2048}" \
        --vocab "${VOCAB:-32000}" || exit 1
fi
LOGS="$OUT/logs"
mkdir -p "$LOGS"

echo "machine: nproc $(nproc); $(free -m | awk '/^Mem:/ {print "mem total " $2 " MB, available " $7 " MB"}')"
echo "model: $MODEL ($(du -m "$DATA" | cut -f1) MB data)"
echo "binary: $BIN ($(stat -c '%y' "$BIN" | cut -d. -f1))"

wall_s() {  # "Elapsed (wall clock) time (h:mm:ss or m:ss): 1:02.34" -> seconds
    awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$1"
}
rss_mb() { awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$1"; }
status() { awk -F': ' '/Exit status/ { print $2 }' "$1"; }

declare -A WALL RSS RC
ORDER=()

# run NAME CMD...: time CMD with /usr/bin/time -v; log in $LOGS/NAME.log
run() {
    local name="$1"; shift
    local log="$LOGS/$name.log" tries=0 before after
    while :; do
        cat "$DATA" > /dev/null   # warm-up read
        before="$(stat -c '%Y %s' "$BIN")"
        echo "== $name: $*" >&2
        "$TIME" -v -o "$log.time" "$@" > "$log" 2>&1
        after="$(stat -c '%Y %s' "$BIN")"
        tries=$((tries + 1))
        if [ "$before" != "$after" ] && [[ "$name" != python* ]] && [ "$tries" -le 2 ]; then
            echo "   binary changed during the run; rerunning" >&2
            continue
        fi
        break
    done
    cat "$log.time" >> "$log"
    WALL[$name]="$(wall_s "$log.time")"
    RSS[$name]="$(rss_mb "$log.time")"
    RC[$name]="$(status "$log.time")"
    rm -f "$log.time"
    ORDER+=("$name")
    if [ "${RC[$name]}" != 0 ]; then
        echo "   FAILED (exit ${RC[$name]}; 124 = timeout after ${TIMEOUT}s); last lines of $log:" >&2
        grep -v -e '^\s' -e '^Command being timed' "$log" | tail -5 >&2
    fi
    echo "   wall ${WALL[$name]} s, peak RSS ${RSS[$name]} MB" >&2
}

# Baseline: python onnx load + save with all tensors to one external file.
run python_onnx python3 -c "
import onnx, sys
m = onnx.load(sys.argv[1])
onnx.save_model(m, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True, location='copy.data')
" "$MODEL" "$OUT/copy.onnx"
rm -f "$OUT/copy.onnx" "$OUT/copy.data"

graft() {
    local name="$1"; shift
    run "$name" timeout "$TIMEOUT" "$BIN" "$MODEL" "$@" -r 16 -o "$OUT/out.$name.onnx"
    ls -la "$OUT"/out."$name".* >> "$LOGS/$name.log" 2>/dev/null
    rm -f "$OUT"/out."$name".*
}
graft lora --variant lora
graft delora --variant delora
graft pissa --variant pissa
graft pissa_niter4 --variant pissa --pissa-niter 4

bw="${WALL[python_onnx]}"; br="${RSS[python_onnx]}"
echo
printf '%-14s %9s %13s %11s %10s %5s\n' variant "wall s" "peak RSS MB" "wall/py" "RSS/py" exit
for n in "${ORDER[@]}"; do
    awk -v n="$n" -v w="${WALL[$n]}" -v r="${RSS[$n]}" -v bw="$bw" -v br="$br" -v rc="${RC[$n]}" \
        'BEGIN { printf "%-14s %9.2f %13d %11.3f %10.3f %5s\n", n, w, r, w / bw, r / br, rc }'
done
echo "(logs: $LOGS)"
