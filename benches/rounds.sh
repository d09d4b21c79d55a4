# Sourced by the benchmarks that time lora-graft against a copy of a synthetic model's
# data file in alternating rounds (pissa_bench.sh, write_bench.sh): the settings, the
# model (made by make_synthetic.py if absent), `run` and `median`.
#   the caller sets HERE (its folder) and USAGE, and passes its arguments on.
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
OUT="${1:?usage: $USAGE}"
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
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
