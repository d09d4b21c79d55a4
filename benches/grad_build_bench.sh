#!/usr/bin/env bash
# Times building the training graph (`lora-graft grad`, LoRA r 16 on q/k/v/o, batch 1 x
# 16) of the synthetic Llama at 12, 24 and 48 layers, to show the build is linear in the
# node count: a linear build takes ~2x the time for 2x the layers, a quadratic one ~4x.
#
#   benches/grad_build_bench.sh [OUT_DIR]       (default /tmp/lora-graft-grad-bench)
#   HIDDEN=2048 REPEAT=3 LAYER_LIST="12 24 48" benches/grad_build_bench.sh
#
# Models come from make_synthetic.py (numpy + onnx: set PYTHON, default the tests' venv
# target/py-venv/bin/python, else python3). Reports the median wall time of REPEAT runs
# per size and the ratio of each size's median to the first's.
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
OUT="${1:-/tmp/lora-graft-grad-bench}"
HIDDEN="${HIDDEN:-2048}"
REPEAT="${REPEAT:-3}"
LAYER_LIST="${LAYER_LIST:-12 24 48}"
PYTHON="${PYTHON:-$ROOT/target/py-venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
[ -x "$BIN" ] || { echo "missing $BIN (cargo build --release)" >&2; exit 1; }

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

first=""
for L in $LAYER_LIST; do
    dir="$OUT/l$L-h$HIDDEN"
    if [ ! -f "$dir/model.onnx" ]; then
        "$PYTHON" "$HERE/make_synthetic.py" "$dir" --layers "$L" --hidden "$HIDDEN" --vocab 8192 >/dev/null || exit 1
    fi
    nodes=""
    times=""
    for _ in $(seq "$REPEAT"); do
        rm -f "$dir"/out.train.*
        start=$(date +%s.%N)
        log=$("$BIN" grad "$dir/model.onnx" --variant lora -r 16 --target-names 'q|k|v|o' \
            --batch 1 --seq 16 -o "$dir/out.train.onnx" 2>&1) || { echo "$log" >&2; exit 1; }
        end=$(date +%s.%N)
        times="$times $(echo "$end - $start" | bc -l)"
        nodes=$(echo "$log" | sed -n 's/.* \([0-9]*\) forward nodes differentiated.*/\1/p')
    done
    rm -f "$dir"/out.train.*
    med=$(echo "$times" | tr ' ' '\n' | grep . | median)
    [ -z "$first" ] && first=$med
    printf "layers %3s  differentiated nodes %6s  median %7.2f s  (runs:%s)  ratio to first %.2f\n" \
        "$L" "$nodes" "$med" "$times" "$(echo "$med / $first" | bc -l)"
done
