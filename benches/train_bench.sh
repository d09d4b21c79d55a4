#!/usr/bin/env bash
# Time `lora-graft train` against PyTorch eager + PEFT: LoRA r 16 alpha 32 on q/k/v/o_proj,
# AdamW lr 1e-4, grad-norm clip 1.0, fp32, causal-LM loss, same model, data and threads.
#
#   benches/train_bench.sh [OUT_DIR]          (default /tmp/lora-graft-train-bench)
#   LAYERS=1 HIDDEN=64 VOCAB=512 STEPS=3 SEQ=16 BATCH=2 benches/train_bench.sh /tmp/lg_tiny
#
# The summary ends with the products' GFLOP a step, faer's rate on them in situ and each
# tool's whole-step rate, beside this core's ceiling (benches/fma_peak.rs, built and run
# with cargo before the runs: the f32 multiply-add peak and faer's hot 512^3 product).
#
# Model: a random Llama (LAYERS 4, HIDDEN 512, HEADS 8, INTERMEDIATE 1376, VOCAB 8192),
# written to OUT_DIR by make_train_bench_model.py if OUT_DIR/model.onnx is absent (delete
# OUT_DIR after changing these). Data (STEPS x BATCH rows of SEQ random ids) is rewritten
# every run. Training: STEPS 20, BATCH 8, SEQ 128, THREADS (default nproc) for both tools;
# ATTN (sdpa or eager) picks PyTorch's attention kernel. BIN is copied to OUT_DIR first
# so a rebuild during the run does not matter. Each tool runs once. lora-graft runs
# data-parallel workers on a divisor of BATCH (THREADS 6, BATCH 8: 4 workers); PyTorch
# uses THREADS intra-op threads. The tools take turns, REPEAT times each (default 3),
# and the table gives each one's median run, then the median of the turn-by-turn ratios.
#
# GENAI=1 also trains onnxruntime-genai's builds of the same checkpoint (made on demand by
# make_genai_builds.py: fp32 and int4, GroupQueryAttention, MatMulNBits 4 bits in blocks
# of 32), LoRA on their qkv_proj and o_proj (the builder fuses q, k and v): the int4
# model's steps/s and peak RSS against the fp32 build's, in the same turns. MICRO=M (with
# GENAI=1) also trains both builds with --micro-batch M (gradient accumulation over passes
# of M rows), in the same turns.
#
# Columns: steps/s (steady) = steps 2..N (lora-graft: from the tokens_per_s of its
# metrics file; PyTorch: timed per step); first step s; train s = the N steps; wall s and
# peak RSS = the whole process (/usr/bin/time -v: imports, model load, graph build, save).
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN="${BIN:-$ROOT/target/release/lora-graft}"
OUT="${1:-/tmp/lora-graft-train-bench}"
STEPS="${STEPS:-20}" BATCH="${BATCH:-8}" SEQ="${SEQ:-128}" THREADS="${THREADS:-$(nproc)}"
REPEAT="${REPEAT:-3}"
R=16 ALPHA=32 LR=1e-4 CLIP=1.0
TIME=/usr/bin/time

[ -x "$BIN" ] || { echo "missing $BIN (build it with cargo build --release)" >&2; exit 1; }
[ -x "$TIME" ] || { echo "missing $TIME (apt-get install -y time)" >&2; exit 1; }

MODEL="$OUT/model.onnx"
if [ ! -f "$MODEL" ] || [ ! -f "$MODEL.data" ] || [ ! -d "$OUT/hf" ]; then
    python3 "$HERE/make_train_bench_model.py" "$OUT" --seq "$SEQ" --rows $((STEPS * BATCH)) || exit 1
else
    python3 "$HERE/make_train_bench_model.py" "$OUT" --data-only --seq "$SEQ" --rows $((STEPS * BATCH)) || exit 1
fi
GENAI="${GENAI:-0}" MICRO="${MICRO:-}"
if [ "$GENAI" = 1 ]; then
    python3 "$HERE/make_genai_builds.py" "$OUT" int4 fp32 || exit 1
fi
LOGS="$OUT/logs"
mkdir -p "$LOGS"
cp "$BIN" "$OUT/lora-graft"

echo "machine: nproc $(nproc); $(free -m | awk '/^Mem:/ {print "mem total " $2 " MB, available " $7 " MB"}')"
echo "model: $MODEL ($(du -m "$MODEL.data" | cut -f1) MB data); $(python3 -c "import json,sys; c=json.load(open(sys.argv[1]))
print(f\"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}\")" "$OUT/hf/config.json")"
echo "binary: $BIN ($(stat -c '%y' "$BIN" | cut -d. -f1))"
echo "run: $STEPS steps x batch $BATCH x seq $SEQ, $THREADS threads, r $R alpha $ALPHA lr $LR grad-clip $CLIP"

wall_s() {  # "Elapsed (wall clock) time (h:mm:ss or m:ss): 1:02.34" -> seconds
    awk -F': ' '/Elapsed \(wall clock\)/ {
        n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$1"
}
rss_mb() { awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$1"; }
status() { awk -F': ' '/Exit status/ { print $2 }' "$1"; }

# run NAME CMD...: time CMD with /usr/bin/time -v; stdout in $LOGS/NAME.out, the rest in NAME.log
run() {
    local name="$1"; shift
    echo "== $name: $*" >&2
    "$TIME" -v -o "$LOGS/$name.time" "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.log"
    if [ "$(status "$LOGS/$name.time")" != 0 ]; then
        echo "   FAILED (exit $(status "$LOGS/$name.time")); last lines of $LOGS/$name.log:" >&2
        tail -5 "$LOGS/$name.log" >&2
        exit 1
    fi
    echo "   wall $(wall_s "$LOGS/$name.time") s, peak RSS $(rss_mb "$LOGS/$name.time") MB" >&2
}

# This core's arithmetic ceiling, before the runs (a build, if any, must not overlap them).
(cd "$ROOT" && cargo bench --quiet --bench fma_peak) > "$LOGS/peak.txt" 2> "$LOGS/peak.log" \
    || echo "(cargo bench --bench fma_peak failed: see $LOGS/peak.log)" > "$LOGS/peak.txt"

ADAPTER="$OUT/adapter.safetensors"
# The two tools alternate, REPEAT times each, so that a slow spell of a shared machine
# hits both; the table gives each tool's median run.
for i in $(seq 1 "$REPEAT"); do
    rm -f "$OUT"/adapter.*
    run "lora_graft.$i" "$OUT/lora-graft" train "$MODEL" --variant lora -r $R --alpha $ALPHA \
        --target-names 'q_proj|k_proj|v_proj|o_proj' --data "$OUT/data.jsonl" --steps "$STEPS" \
        --batch "$BATCH" --seq "$SEQ" --lr $LR --grad-clip $CLIP --threads "$THREADS" -o "$ADAPTER" --quiet
    cp "$OUT/adapter.metrics.jsonl" "$LOGS/lora_graft.$i.metrics.jsonl"
    if [ "$GENAI" = 1 ]; then
        for p in fp32 int4 ${MICRO:+fp32_micro int4_micro}; do
            rm -f "$OUT"/adapter.*
            micro=()
            case "$p" in *_micro) micro=(--micro-batch "$MICRO") ;; esac
            run "lora_graft_genai_$p.$i" "$OUT/lora-graft" train "$OUT/genai_${p%_micro}/model.onnx" --variant lora \
                -r $R --alpha $ALPHA --target-names 'qkv_proj|o_proj' --data "$OUT/data.jsonl" \
                --steps "$STEPS" --batch "$BATCH" ${micro[@]+"${micro[@]}"} --seq "$SEQ" --lr $LR --grad-clip $CLIP \
                --threads "$THREADS" -o "$ADAPTER" --quiet
            cp "$OUT/adapter.metrics.jsonl" "$LOGS/lora_graft_genai_$p.$i.metrics.jsonl"
        done
    fi
    OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" \
        run "pytorch.$i" python3 "$HERE/train_bench_torch.py" "$OUT" --steps "$STEPS" --batch "$BATCH" \
        --seq "$SEQ" --threads "$THREADS" --r $R --alpha $ALPHA --lr $LR --grad-clip $CLIP
done

# One more lora-graft run on the float model with LORA_GRAFT_PROFILE: the matrix products'
# arithmetic per step and the rate faer's kernel reaches on them in situ.
rm -f "$OUT"/adapter.*
LORA_GRAFT_PROFILE="$LOGS/profile.txt" run "lora_graft_profiled" "$OUT/lora-graft" train "$MODEL" \
    --variant lora -r $R --alpha $ALPHA --target-names 'q_proj|k_proj|v_proj|o_proj' \
    --data "$OUT/data.jsonl" --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --lr $LR \
    --grad-clip $CLIP --threads "$THREADS" -o "$ADAPTER" --quiet

# lora-graft's metrics line k holds tokens_per_s = k * BATCH * (SEQ - 1) / (seconds since
# the training loop began), so step k ended at k * BATCH * (SEQ - 1) / tokens_per_s.
echo
python3 - "$LOGS" "$REPEAT" "$BATCH" "$SEQ" "$GENAI" "$MICRO" "$STEPS" "$THREADS" <<'EOF2'
import json, math, re, statistics, sys
logs, repeat, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
genai, micro = sys.argv[5] == "1", sys.argv[6]
steps, threads = int(sys.argv[7]), int(sys.argv[8])

def time_v(path):  # wall seconds and peak RSS (MB) from /usr/bin/time -v
    text = open(path).read()
    wall = re.search(r"Elapsed \(wall clock\).*: (\S+)", text).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return secs, rss

def lora_graft(i, tag="lora_graft"):
    lines = [json.loads(l) for l in open(f"{logs}/{tag}.{i}.metrics.jsonl")]
    ends = [m["step"] * batch * (seq - 1) / m["tokens_per_s"] for m in lines]
    n = len(ends)
    wall, rss = time_v(f"{logs}/{tag}.{i}.time")
    return dict(steady=(n - 1) / (ends[-1] - ends[0]) if n > 1 else None, first=ends[0],
                train=ends[-1], wall=wall, rss=rss, loss=lines[0]["loss"], last=lines[-1]["loss"])

def pytorch(i):
    t = json.loads(open(f"{logs}/pytorch.{i}.out").read().strip().splitlines()[-1])
    wall, rss = time_v(f"{logs}/pytorch.{i}.time")
    return t, dict(steady=t["steady_steps_per_s"], first=t["first_step_s"], train=t["train_s"],
                   wall=wall, rss=rss, loss=t["loss_first"], last=t["loss_last"])

lg_runs = [lora_graft(i) for i in range(1, repeat + 1)]
pt_runs = [pytorch(i) for i in range(1, repeat + 1)]
info = pt_runs[0][0]
pt_runs = [r for _, r in pt_runs]
f = lambda v, fmt: "-" if v is None else format(v, fmt)
tools = [("lora-graft", lg_runs)]
if genai:
    for p in ("fp32", "int4") + (("fp32_micro", "int4_micro") if micro else ()):
        label = p.replace("_micro", f" micro {micro}")
        tools.append((f"lora-graft genai {label}",
                      [lora_graft(i, f"lora_graft_genai_{p}") for i in range(1, repeat + 1)]))
tools.append((f"pytorch+peft ({info['attn']})", pt_runs))
print("steady steps/s of each run:")
for name, runs in tools:
    print(f"  {name:22s}", " ".join(f(r["steady"], ".3f") for r in runs))
med = lambda runs, k: statistics.median(r[k] for r in runs) if all(r[k] is not None for r in runs) else None
meds = {name: {k: med(runs, k) for k in runs[0]} for name, runs in tools}
print(f"\nmedians of {repeat} runs each:")
print(f"{'tool':26s} {'steps/s':>8s} {'first s':>8s} {'train s':>8s} {'wall s':>8s} {'RSS MB':>7s}"
      f" {'loss 1':>9s} {'loss N':>9s}")
for name, r in meds.items():
    print(f"{name:26s} {f(r['steady'], '8.3f')} {r['first']:8.2f} {r['train']:8.2f} {r['wall']:8.2f}"
          f" {r['rss']:7.0f} {r['loss']:9.5f} {r['last']:9.5f}")

def ratio_row(label, a, b):
    ratio = lambda k: None if a[k] is None or not b[k] else a[k] / b[k]
    print(f"{label:26s} {f(ratio('steady'), '8.3f')} {f(ratio('first'), '8.3f')}"
          f" {f(ratio('train'), '8.3f')} {f(ratio('wall'), '8.3f')} {f(ratio('rss'), '7.3f')}")

pt = meds[tools[-1][0]]
for name, _ in tools[:-1]:
    ratio_row(f"{name} / pytorch", meds[name], pt)
# Each turn against the PyTorch turn right after it: a slow spell of the machine falls on
# both sides of a pair, so the pairs' median moves less than the ratio of two medians.
pairs = [a["steady"] / b["steady"] for a, b in zip(lg_runs, pt_runs) if a["steady"] and b["steady"]]
if pairs:
    print(f"lora-graft / pytorch, turn by turn: {' '.join(f'{r:.3f}' for r in pairs)};"
          f" median {statistics.median(pairs):.3f}")
if genai:
    ratio_row("genai int4 / genai fp32", meds["lora-graft genai int4"], meds["lora-graft genai fp32"])
    if micro:
        ratio_row(f"  the same, micro {micro}", meds[f"lora-graft genai int4 micro {micro}"],
                  meds[f"lora-graft genai fp32 micro {micro}"])
        ratio_row(f"int4 micro {micro} / fp32", meds[f"lora-graft genai int4 micro {micro}"],
                  meds["lora-graft genai fp32"])
# Matrix products from the profile (seconds, calls, op, node, shapes, einsum expression):
# 2 x the product of every axis's size, per call (causal attention's products count
# whole, though lora-graft skips their zero blocks); the seconds are summed over workers.
# A worker's products of 4M multiply-adds or more, and its attention kernels, run on
# THREADS / workers threads (batch 1: all of them), so their seconds count that many cores.
workers = max(d for d in range(1, threads + 1) if batch % d == 0)
flops = secs = best = 0.0
# The attention kernels count as the products they run: Attention (inputs Q, K, mask,
# V; outputs P, O) two of 2 x |P| x the head's width, AttentionGrad (dO, V, mask, P, K,
# Q) three.
fused_products = {"Attention": (0, 4, 2), "AttentionGrad": (0, 3, 3)}  # width from, P at, products
for line in open(f"{logs}/profile.txt"):
    f_ = line.rstrip("\n").split("\t")
    if len(f_) < 5 or f_[2] not in ("FaerMatMul", *fused_products):
        continue
    shapes = [[int(d) for d in m.split(",") if d.strip()] for m in re.findall(r"\[([\d, ]*)\]", f_[4])]
    if f_[2] == "FaerMatMul":
        if len(f_) < 6:
            continue
        ins = f_[5].split("->")[0].split(",")
        size = {c: d for term, shape in zip(ins, shapes[:2]) for c, d in zip(term, shape) if d != 1}
        macs = math.prod(size.values())
    else:
        width_of, p_at, products = fused_products[f_[2]]
        macs = products * math.prod(shapes[p_at]) * shapes[width_of][-1]
    node = 2 * macs * int(f_[1])
    # (the attention kernels share their heads among the worker's threads at any size)
    cores = threads // workers if macs >= 1 << 22 or f_[2] in fused_products else 1
    core_secs = float(f_[0]) * cores
    flops, secs = flops + node, secs + core_secs
    if float(f_[0]) >= 0.01:  # the profile prints 4 decimals: time only what it resolves
        best = max(best, node / core_secs / 1e9)
per_step = flops / steps / 1e9
print(f"\nmatrix products: {per_step:.1f} GFLOP a step; faer in situ {flops / max(secs, 1e-9) / 1e9:.0f} GFLOP/s a core"
      f" (its best node {best:.0f}); each tool's whole step, GFLOP/s a core ({threads} cores):")
for name, r in meds.items():
    if r["steady"] and not name.startswith("lora-graft genai"):
        print(f"  {name:26s} {per_step * r['steady'] / threads:6.0f}")
print("this core's ceiling (benches/fma_peak.rs, one thread):")
for line in open(f"{logs}/peak.txt"):
    print(f"  {line.strip()}")
print(f"(torch {info['torch']}, {info['threads']} threads, {info['trainable_params']} trainable params;"
      f" loss 1 should agree: same weights and batch, B = 0)")
EOF2
echo "(logs: $LOGS)"
