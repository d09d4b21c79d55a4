#!/usr/bin/env bash
# Every variant beside LoRA: graft wall time and peak RSS on the graft benchmark's model
# (24 layers x hidden 2048, benches/make_synthetic.py), and training steps/s on the
# training benchmark's model (benches/make_train_bench_model.py: 4 layers x 512, needs
# torch + transformers in PYTHON). The variants take turns, REPEAT times each (default
# 3); the table gives medians and their ratio to LoRA's from the same run.
#
#   benches/variants_bench.sh [GRAFT_DIR] [TRAIN_DIR]
#   (defaults /tmp/lora-graft-bench, /tmp/lora-graft-train-bench; models made if absent)
#   VARIANTS="lora dora" REPEAT=5 STEPS=10 PYTHON=/path/to/venv/python benches/variants_bench.sh
#
# Graft: -r 16 (PiSSA with --pissa-niter 4; its exact SVD takes minutes, graft_bench.sh
# times it; ROAD with groups of 32). Training: -r 16, STEPS steps (default 10) of BATCH 8 x SEQ 128, every core;
# steps/s is steady state (steps 2..N, from the metrics file's tokens_per_s).
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
GRAFT_DIR="${1:-/tmp/lora-graft-bench}"
TRAIN_DIR="${2:-/tmp/lora-graft-train-bench}"
PYTHON="${PYTHON:-python3}"
REPEAT="${REPEAT:-3}" STEPS="${STEPS:-10}" BATCH=8 SEQ=128
VARIANTS="${VARIANTS:-lora pissa olora delora dora ia3 ia3_ff hra road vera}"
TIME=/usr/bin/time
[ -x "$BIN" ] || { echo "missing $BIN (cargo build --release)" >&2; exit 1; }
[ -x "$TIME" ] || { echo "missing $TIME (apt-get install -y time)" >&2; exit 1; }

[ -f "$GRAFT_DIR/model.onnx" ] || "$PYTHON" "$HERE/make_synthetic.py" "$GRAFT_DIR" --layers 24 --hidden 2048 --vocab 32000 || exit 1
if [ ! -f "$TRAIN_DIR/model.onnx" ] || [ ! -d "$TRAIN_DIR/hf" ]; then
    "$PYTHON" "$HERE/make_train_bench_model.py" "$TRAIN_DIR" --seq "$SEQ" --rows $((STEPS * BATCH)) || exit 1
else
    "$PYTHON" "$HERE/make_train_bench_model.py" "$TRAIN_DIR" --data-only --seq "$SEQ" --rows $((STEPS * BATCH)) || exit 1
fi
LOGS="$GRAFT_DIR/variant-logs"
rm -rf "$LOGS" && mkdir -p "$LOGS"
cp "$BIN" "$LOGS/lora-graft"   # a rebuild during the run does not matter
echo "machine: nproc $(nproc); binary: $BIN ($(stat -c '%y' "$BIN" | cut -d. -f1)); $REPEAT runs each"

options() {  # per-variant flags
    case "$1" in
        pissa) echo "--pissa-niter 4" ;;
        road) echo "--road-group-size 32" ;;   # divides 2048, 5632 and the training model's 1376
        *) echo "" ;;
    esac
}
for i in $(seq 1 "$REPEAT"); do
    for v in $VARIANTS; do
        out="$GRAFT_DIR/out.$v"
        echo "== graft $v ($i)" >&2
        "$TIME" -v -o "$LOGS/graft.$v.$i.time" "$LOGS/lora-graft" "$GRAFT_DIR/model.onnx" --variant "$v" -r 16 \
            $(options "$v") -o "$out.onnx" > "$LOGS/graft.$v.$i.log" 2>&1 || echo "   FAILED: $LOGS/graft.$v.$i.log" >&2
        rm -f "$out".*
        echo "== train $v ($i)" >&2
        rm -f "$TRAIN_DIR"/adapter.*
        "$TIME" -v -o "$LOGS/train.$v.$i.time" "$LOGS/lora-graft" train "$TRAIN_DIR/model.onnx" --variant "$v" -r 16 \
            $(options "$v") --data "$TRAIN_DIR/data.jsonl" --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" \
            --lr 1e-4 --quiet -o "$TRAIN_DIR/adapter.safetensors" > "$LOGS/train.$v.$i.log" 2>&1 \
            || echo "   FAILED: $LOGS/train.$v.$i.log" >&2
        cp "$TRAIN_DIR/adapter.metrics.jsonl" "$LOGS/train.$v.$i.metrics.jsonl" 2>/dev/null
    done
done

"$PYTHON" - "$LOGS" "$REPEAT" "$BATCH" "$SEQ" $VARIANTS <<'PY'
import json, re, statistics, sys
logs, repeat, batch, seq, variants = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]

def time_v(path):
    text = open(path).read()
    if re.search(r"Exit status: (\d+)", text).group(1) != "0":
        return None, None
    secs = 0.0
    for part in re.search(r"Elapsed \(wall clock\).*: (\S+)", text).group(1).split(":"):
        secs = secs * 60 + float(part)
    return secs, int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024

def steady(path):  # steps 2..N per second; line k: tokens_per_s = k*batch*(seq-1)/seconds
    try:
        lines = [json.loads(l) for l in open(path)]
    except OSError:
        return None
    ends = [m["step"] * batch * (seq - 1) / m["tokens_per_s"] for m in lines]
    return (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None

med = lambda xs: statistics.median(xs) if xs and None not in xs else None
rows = {}
for v in variants:
    g = [time_v(f"{logs}/graft.{v}.{i}.time") for i in range(1, repeat + 1)]
    rows[v] = dict(wall=med([w for w, _ in g]), rss=med([r for _, r in g]),
                   steps=med([steady(f"{logs}/train.{v}.{i}.metrics.jsonl") for i in range(1, repeat + 1)]))
base = rows.get("lora")
f = lambda x, fmt: "-" if x is None else format(x, fmt)
ratio = lambda v, k: None if not base or rows[v][k] is None or not base[k] else rows[v][k] / base[k]
print(f"\n{'variant':8s} {'graft s':>8s} {'/lora':>6s} {'RSS MB':>7s} {'/lora':>6s} {'train steps/s':>14s} {'/lora':>6s}")
for v in variants:
    r = rows[v]
    print(f"{v:8s} {f(r['wall'], '8.2f')} {f(ratio(v, 'wall'), '6.2f')} {f(r['rss'], '7.0f')} {f(ratio(v, 'rss'), '6.2f')}"
          f" {f(r['steps'], '14.3f')} {f(ratio(v, 'steps'), '6.2f')}")
print(f"(medians of {repeat} runs; logs: {logs})")
PY
