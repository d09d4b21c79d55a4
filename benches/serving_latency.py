#!/usr/bin/env python3
"""ONNX Runtime latency of serving adapters (run by benches/serving_bench.sh).

    serving_latency.py BASE.onnx SERVED.onnx ADAPTER.onnx_adapter [--batch 1] [--seq 128]
        [--rounds 30] [--threads 2] [--unmerged GRAFTED.onnx] [--merged MERGED.onnx]

Times one forward pass of BASE, of SERVED (grafted with --adapter-inputs) with no adapter
active, of SERVED with ADAPTER active (ort.LoraAdapter + RunOptions), and of the
grafted (adapter baked in, unmerged) and merged models when given, taking turns
(in a new random order each round) so that the machine's noise falls on all three alike, after 3 warm-up runs
each. Prints the median milliseconds of each and their ratio to the base model's.
"""
import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("served")
    ap.add_argument("adapter")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unmerged")
    ap.add_argument("--merged")
    a = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.log_severity_level = 3
    base = ort.InferenceSession(a.base, opts, providers=["CPUExecutionProvider"])
    served = ort.InferenceSession(a.served, opts, providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(a.adapter)
    active = ort.RunOptions()
    active.add_active_adapter(adapter)
    ids = np.random.default_rng(0).integers(4, 1000, (a.batch, a.seq)).astype(np.int64)
    feeds = {"input_ids": ids}
    runs = {
        "base": lambda: base.run(None, feeds),
        "no adapter": lambda: served.run(None, feeds),
        "adapter active": lambda: served.run(None, feeds, active),
    }
    for name, path in (("unmerged", a.unmerged), ("merged", a.merged)):
        if path:
            s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            runs[name] = lambda s=s: s.run(None, feeds)
    times = {k: [] for k in runs}
    for _ in range(3):
        for f in runs.values():
            f()
    order = list(runs)
    rng = np.random.default_rng(1)
    for _ in range(a.rounds):
        rng.shuffle(order)  # no configuration always runs right after another
        for k in order:
            f = runs[k]
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"ONNX Runtime {ort.__version__}, batch {a.batch} x {a.seq}, {a.threads} threads, {a.rounds} rounds")
    for k, m in med.items():
        print(f"  {k:15s} {m:8.2f} ms   {m / med['base']:.3f}x base")


if __name__ == "__main__":
    main()
