#!/usr/bin/env python3
"""Generate the training benchmark's model and data (see benches/train_bench.sh).

    python3 benches/make_train_bench_model.py OUT_DIR [--layers 4] [--hidden 512] [--heads 8]
        [--intermediate 1376] [--vocab 8192] [--rows 160 --seq 128]
    python3 benches/make_train_bench_model.py OUT_DIR --data-only --rows 160 --seq 128

Defaults come from the env vars LAYERS HIDDEN HEADS INTERMEDIATE VOCAB SEQ (flags win).
Writes, all generated on demand and never committed:
  OUT_DIR/hf/                        transformers save_pretrained of a random fp32 Llama
                                     (LlamaConfig, default initializer_range; 1-D norm
                                     weights re-randomised as in fixtures/make.py)
  OUT_DIR/model.onnx(+.data)         the same weights, exported like fixtures/make.py's
                                     make_llama: dynamo exporter, input_ids [batch, seq]
                                     int64 (dynamic), output logits, external data;
                                     checked against torch with onnxruntime
  OUT_DIR/data.jsonl                 --rows lines of {"input_ids": [...]}, --seq random ids
                                     each (one training row a line); rewritten every call
--data-only writes just data.jsonl (the vocab is read from OUT_DIR/hf/config.json).
"""
import argparse
import json
import os
import sys
import time

import numpy as np


def env(name, default):
    return int(os.environ.get(name, default))


def make_model(a, out):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class LlamaLogits(LlamaForCausalLM):
        # a subclass (not a wrapper) so module paths stay model.layers.0.self_attn.q_proj
        def forward(self, input_ids):
            return super().forward(input_ids=input_ids, use_cache=False).logits

    inter = a.intermediate or -(-8 * a.hidden // 3 // 32) * 32  # 8/3 h rounded up to 32: 512 -> 1376
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=inter,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.heads, max_position_embeddings=max(2048, a.seq),
                      tie_word_embeddings=False, use_cache=False, attn_implementation="eager",
                      bos_token_id=0, eos_token_id=1, pad_token_id=3)
    torch.manual_seed(a.seed)
    model = LlamaLogits(cfg).eval()
    with torch.no_grad():  # norm weights are all ones at init; the exporter would dedup them
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
    model.save_pretrained(os.path.join(out, "hf"))

    ids = torch.from_numpy(np.random.default_rng(a.seed).integers(0, a.vocab, (2, 7)))
    path = os.path.join(out, "model.onnx")
    torch.onnx.export(model, (ids,), path, dynamo=True,
                      dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}},
                      input_names=["input_ids"], output_names=["logits"],
                      external_data=True, verbose=False)
    assert os.path.exists(path + ".data"), "the exporter wrote no model.onnx.data"

    import onnxruntime as ort  # same logits from ONNX as from torch, at another shape
    ids = torch.from_numpy(np.random.default_rng(a.seed + 1).integers(0, a.vocab, (3, 11)))
    with torch.no_grad():
        want = model(ids).numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input_ids": ids.numpy()})[0]
    diff = float(np.abs(got - want).max())
    assert diff < 1e-3, f"onnxruntime vs torch logits differ by {diff}"
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({n / 1e6:.1f}M params: {a.layers} layers, hidden {a.hidden}, "
          f"{a.heads} heads, intermediate {inter}, vocab {a.vocab}; ort diff {diff:.2g})",
          file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=env("LAYERS", 4))
    ap.add_argument("--hidden", type=int, default=env("HIDDEN", 512))
    ap.add_argument("--heads", type=int, default=env("HEADS", 8))
    ap.add_argument("--intermediate", type=int, default=env("INTERMEDIATE", 0),
                    help="0: 8/3 hidden rounded up to a multiple of 32")
    ap.add_argument("--vocab", type=int, default=env("VOCAB", 8192))
    ap.add_argument("--rows", type=int, default=160, help="data lines (steps x batch)")
    ap.add_argument("--seq", type=int, default=env("SEQ", 128))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-only", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    t0 = time.time()

    if a.data_only:
        with open(os.path.join(a.out_dir, "hf", "config.json")) as f:
            a.vocab = json.load(f)["vocab_size"]
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers
        transformers.logging.set_verbosity_error()
        make_model(a, a.out_dir)

    rng = np.random.default_rng(a.seed + 2)
    with open(os.path.join(a.out_dir, "data.jsonl"), "w") as f:
        for row in rng.integers(0, a.vocab, (a.rows, a.seq)):
            f.write(json.dumps({"input_ids": row.tolist()}) + "\n")
    print(f"wrote {a.out_dir}/data.jsonl ({a.rows} rows x {a.seq} tokens) in {time.time() - t0:.1f}s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
