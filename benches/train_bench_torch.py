#!/usr/bin/env python3
"""PyTorch eager + PEFT side of benches/train_bench.sh: LoRA training steps, timed.

    python3 benches/train_bench_torch.py OUT_DIR [--steps 20] [--batch 8] [--seq 128]
        [--threads T] [--r 16] [--alpha 32] [--lr 1e-4] [--grad-clip 1.0] [--attn sdpa]

Defaults come from the env vars STEPS BATCH SEQ THREADS ATTN (flags win; THREADS
defaults to every core). Loads OUT_DIR/hf (fp32) and OUT_DIR/data.jsonl (one row a line),
both written by make_train_bench_model.py, wraps the model in PEFT LoRA on
q/k/v/o_proj (dropout 0), then runs --steps AdamW steps (forward, causal-LM loss with
labels = input_ids, backward, grad-norm clipping, step). The batches are the ones
`lora-graft train` picks (its per-epoch shuffle with --seed 0, ported below), so the
first-step losses of the two tools should agree. Only the steps are timed (model
loading is not); each step is timed on its own. Prints one JSON line on stdout.
"""
import argparse
import json
import os
import time

M64 = (1 << 64) - 1


class Rng:
    """lora-graft's src/rng.rs: xoshiro256** seeded by splitmix64."""

    def __init__(self, seed):
        self.s = []
        for _ in range(4):
            seed = (seed + 0x9E3779B97F4A7C15) & M64
            z = seed
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            self.s.append(z ^ (z >> 31))

    def next_u64(self):
        rotl = lambda v, k: ((v << k) | (v >> (64 - k))) & M64
        s = self.s
        result = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result


def batch_rows(n_rows, batch, step, seed=0):
    """Row indices of (0-based) step `step`, as src/train.rs batch_rows picks them."""
    epoch, k = divmod(step, max(n_rows // batch, 1))
    order = list(range(n_rows))
    rng = Rng(seed ^ ((epoch * 0x9E3779B9) & M64))
    for i in range(n_rows - 1, 0, -1):
        j = rng.next_u64() % (i + 1)
        order[i], order[j] = order[j], order[i]
    return [order[(k * batch + b) % n_rows] for b in range(batch)]


def main():
    e = os.environ.get
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=int(e("STEPS", 20)))
    ap.add_argument("--batch", type=int, default=int(e("BATCH", 8)))
    ap.add_argument("--seq", type=int, default=int(e("SEQ", 128)))
    ap.add_argument("--threads", type=int, default=int(e("THREADS", os.cpu_count())))
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)  # lora-graft's and torch's default
    ap.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    ap.add_argument("--attn", default=e("ATTN", "sdpa"), help="sdpa (transformers' default) or eager")
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    with open(os.path.join(a.out_dir, "data.jsonl")) as f:
        for line in f:
            ids = json.loads(line)["input_ids"]
            assert len(ids) == a.seq, f"data.jsonl rows hold {len(ids)} tokens, not --seq {a.seq}"
            rows.append(ids)
    data = torch.tensor(rows, dtype=torch.int64)
    batches = [data[batch_rows(len(rows), a.batch, s)] for s in range(a.steps)]

    model = LlamaForCausalLM.from_pretrained(os.path.join(a.out_dir, "hf"), dtype=torch.float32,
                                             attn_implementation=a.attn)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)

    times, losses = [], []
    for x in batches:
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())

    steady = len(times) > 1 and (len(times) - 1) / sum(times[1:])
    print(json.dumps({
        "tool": "pytorch+peft", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "attn": a.attn, "steps": a.steps, "batch": a.batch, "seq": a.seq,
        "trainable_params": sum(p.numel() for p in params),
        "first_step_s": times[0], "train_s": sum(times), "steady_steps_per_s": steady or None,
        "loss_first": losses[0], "loss_last": losses[-1],
    }))


if __name__ == "__main__":
    main()
