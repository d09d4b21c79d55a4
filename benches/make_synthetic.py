#!/usr/bin/env python3
"""Generate a Llama-shaped fp32 ONNX model with external data, for benchmarks.

    python3 benches/make_synthetic.py OUT_DIR [--layers 24] [--hidden 2048] [--vocab 32000]

Writes OUT_DIR/model.onnx and OUT_DIR/model.onnx.data. numpy + onnx.helper only.
Weights are streamed to the data file one tensor at a time (the model is never held
in memory); the TensorProtos point into it with location/offset/length.
Generated on demand; never commit the output.

Graph: Gather embedding; per layer RMSNorm (Pow/ReduceMean/Add/Sqrt/Div/Mul),
single-head attention softmax(q k^T / sqrt(d)) v with q/k/v/o as MatMul(x, W),
W stored [d_in, d_out]; residual Adds; SiLU MLP (Sigmoid*Mul) with intermediate
= 2*hidden; final norm; lm_head MatMul. Input input_ids int64 [batch, seq], output logits.
"""
import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spectrum", choices=["flat", "decaying"], default="flat",
                    help="2-D weights: Gaussian (flat top spectrum), or a Gaussian floor plus "
                         "64 directions of geometrically decaying strength (0.93^i), the shape "
                         "of trained weights' top spectra")
    a = ap.parse_args()

    H, L, V = a.hidden, a.layers, a.vocab
    I = 2 * H
    os.makedirs(a.out_dir, exist_ok=True)
    model_path = os.path.join(a.out_dir, "model.onnx")
    data_name = "model.onnx.data"
    data_path = os.path.join(a.out_dir, data_name)

    rng = np.random.default_rng(a.seed)
    inits = []
    nodes = []
    t0 = time.time()

    f = open(data_path + ".tmp", "wb")

    def weight(name, shape, ones=False):
        """Write one fp32 tensor to the data file, return its (external) TensorProto."""
        off = f.tell()
        pad = (-off) % ALIGN
        if pad:
            f.write(b"\0" * pad)
            off += pad
        n = int(np.prod(shape))
        if ones:
            arr = np.ones(n, dtype=np.float32)
        else:
            arr = rng.standard_normal(n, dtype=np.float32)
            arr *= np.float32(0.02)
            if a.spectrum == "decaying" and len(shape) == 2 and min(shape) >= 256:
                k = 64
                left = rng.standard_normal((shape[0], k), dtype=np.float32) / np.float32(np.sqrt(shape[0]))
                right = rng.standard_normal((k, shape[1]), dtype=np.float32) / np.float32(np.sqrt(shape[1]))
                strength = np.float32(0.02 * 8 * np.sqrt(max(shape))) * (np.float32(0.93) ** np.arange(k, dtype=np.float32))
                arr = (arr.reshape(shape) + (left * strength) @ right).reshape(-1)
        f.write(arr.tobytes())
        del arr
        t = TensorProto()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", data_name), ("offset", str(off)), ("length", str(n * 4))):
            e = t.external_data.add()
            e.key, e.value = k, v
        inits.append(t)
        return name

    def scalar(name, value):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
        return name

    def node(op, inputs, name, **attrs):
        out = name + "_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    eps = scalar("rms_eps", 1e-6)
    two = scalar("pow_two", 2.0)
    attn_scale = scalar("attn_scale", 1.0 / float(np.sqrt(H)))

    def rmsnorm(x, prefix, wname):
        w = weight(wname, [H], ones=True)
        p = node("Pow", [x, two], f"{prefix}/Pow")
        m = node("ReduceMean", [p], f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
        e = node("Add", [m, eps], f"{prefix}/Add")
        s = node("Sqrt", [e], f"{prefix}/Sqrt")
        d = node("Div", [x, s], f"{prefix}/Div")
        return node("Mul", [d, w], f"{prefix}/Mul")

    def linear(x, prefix, wname, d_in, d_out):
        w = weight(wname, [d_in, d_out])
        return node("MatMul", [x, w], f"{prefix}/MatMul")

    emb = weight("model.embed_tokens.weight", [V, H])
    h = node("Gather", [emb, "input_ids"], "/model/embed_tokens/Gather", axis=0)

    for i in range(L):
        lp = f"/model/layers.{i}"
        mp = f"model.layers.{i}"
        x = rmsnorm(h, f"{lp}/input_layernorm", f"{mp}.input_layernorm.weight")
        q = linear(x, f"{lp}/self_attn/q_proj", f"{mp}.self_attn.q_proj.weight", H, H)
        k = linear(x, f"{lp}/self_attn/k_proj", f"{mp}.self_attn.k_proj.weight", H, H)
        v = linear(x, f"{lp}/self_attn/v_proj", f"{mp}.self_attn.v_proj.weight", H, H)
        kt = node("Transpose", [k], f"{lp}/self_attn/Transpose", perm=[0, 2, 1])
        sc = node("MatMul", [q, kt], f"{lp}/self_attn/MatMul")
        sc = node("Mul", [sc, attn_scale], f"{lp}/self_attn/Mul")
        pr = node("Softmax", [sc], f"{lp}/self_attn/Softmax", axis=-1)
        at = node("MatMul", [pr, v], f"{lp}/self_attn/MatMul_1")
        o = linear(at, f"{lp}/self_attn/o_proj", f"{mp}.self_attn.o_proj.weight", H, H)
        h = node("Add", [h, o], f"{lp}/Add")
        x = rmsnorm(h, f"{lp}/post_attention_layernorm", f"{mp}.post_attention_layernorm.weight")
        g = linear(x, f"{lp}/mlp/gate_proj", f"{mp}.mlp.gate_proj.weight", H, I)
        u = linear(x, f"{lp}/mlp/up_proj", f"{mp}.mlp.up_proj.weight", H, I)
        sg = node("Sigmoid", [g], f"{lp}/mlp/act_fn/Sigmoid")
        si = node("Mul", [g, sg], f"{lp}/mlp/act_fn/Mul")
        gu = node("Mul", [si, u], f"{lp}/mlp/Mul")
        dn = linear(gu, f"{lp}/mlp/down_proj", f"{mp}.mlp.down_proj.weight", I, H)
        h = node("Add", [h, dn], f"{lp}/Add_1")
        print(f"layer {i + 1}/{L} written ({f.tell() / 2**30:.2f} GiB, {time.time() - t0:.1f}s)",
              file=sys.stderr, flush=True)

    x = rmsnorm(h, "/model/norm", "model.norm.weight")
    w = weight("lm_head.weight", [H, V])
    nodes.append(helper.make_node("MatMul", [x, w], ["logits"], name="/lm_head/MatMul"))
    f.close()

    graph = helper.make_graph(
        nodes,
        "synthetic_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="lora-graft-benches")
    model.ir_version = 8
    os.replace(data_path + ".tmp", data_path)
    # Small: every weight is external. Write the proto directly (onnx.save would try
    # to resolve external data relative to the cwd).
    with open(model_path, "wb") as out:
        out.write(model.SerializeToString())
    onnx.checker.check_model(model_path)  # by path: checks the external data references
    size = os.path.getsize(data_path)
    print(f"wrote {model_path} ({os.path.getsize(model_path)} B) and {data_path} "
          f"({size / 2**30:.2f} GiB) in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
