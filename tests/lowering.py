"""Reference cases for lowering onnxruntime's com.microsoft contrib ops (needs onnx,
onnxruntime, numpy, safetensors).

    python tests/lowering.py OUT_DIR

For each case below: OUT_DIR/<case>.onnx, a model holding ONE contrib op (opsets: default
domain 17, com.microsoft 1; every op input, gamma/beta/bias included, is a graph input with
a fixed shape), and OUT_DIR/<case>.io.safetensors with `input.<name>` (seeded, normal) and
`output.<name>` as ONNX Runtime's CPU kernel computes them (graph optimizations off, one
thread).  float32, or float16 for the *_fp16 cases (SkipLayerNormalization's mean and
inv_std_var are float32 there too: the schema's type U is float only).  OUT_DIR/manifest.json
lists {"case", "op", "domain", "inputs", "outputs", "node_outputs", "attributes", "dtype",
"reference"}; "outputs" are the graph outputs, "node_outputs" the node's output list where
"" marks an output left out; "reference" is "onnxruntime", or "numpy" where ONNX Runtime's
CPU build has no kernel for the op (BiasAdd: CUDA/ROCm only), with the formula below.

Formulas are those of the op schemas onnxruntime 1.32 registers (the text of
docs/ContribOperators.md) and of its CPU kernels, checked against the kernels' outputs.
Prints one line per case; exits non-zero if ONNX Runtime rejects or fails on any case.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from safetensors.numpy import save_file

SHAPE = [2, 5, 16]
HIDDEN = SHAPE[-1]

# (name, shape) of inputs several cases share
X = ("x", SHAPE)
BIAS = ("bias", [HIDDEN])


def case(name, op, inputs, outputs, attributes=None, domain="com.microsoft", dtype="float32",
         numpy_reference=None):
    """`inputs`: [(name, shape)]; `outputs`: node outputs, "" for one left out."""
    return {"case": name, "op": op, "domain": domain, "inputs": inputs, "node_outputs": outputs,
            "attributes": attributes or {}, "dtype": dtype, "numpy_reference": numpy_reference}


SLN_IN = [("input", SHAPE), ("skip", SHAPE), ("gamma", [HIDDEN])]
SLN_OUT4 = ["output", "mean", "inv_std_var", "input_skip_bias_sum"]
BIAS_ADD_SHAPE = [2, 5, 320]  # the CUDA kernel takes C in {320, 640, 1280} only


def bias_add_numpy(feeds):
    # BiasAdd: Y = X + bias + skip, left to right (CUDA kernel:
    # output = input[i] + bias[c] + residual[i]); X, skip [N, S, C] same shape, bias [C].
    return {"y": (feeds["x"] + feeds["bias"]) + feeds["skip"]}


CASES = [
    # Gelu (com.microsoft): Y = 0.5 * X * (1 + erf(X / sqrt(2))).  CPU kernel (shared with
    # ONNX Gelu-20, approximate="none"): t = x * float(M_SQRT1_2); y = 0.5f * x * (erf(t) + 1)
    # with MLAS's erf (MlasComputeErf, which ORT's Erf kernel uses too).  float only on CPU.
    case("Gelu", "Gelu", [X], ["y"]),

    # FastGelu: Y = 0.5 * X * (1 + tanh(0.797885 * X + 0.035677 * X^3)), X = X + bias when the
    # optional bias (1-D, [hidden], broadcast over the last axis) is given.  CPU kernel:
    #   v = x (+ bias[h]);  t = v * (C * v * v + B);  y = 0.5f * v * (tanh(t) + 1)
    # with B = 0.7978845608028654f (sqrt(2/pi)), C = 0.035677408136300125f
    # (0.044715 * sqrt(2/pi)), tanh = MlasComputeTanh (as ORT's Tanh kernel).  In ORT the
    # default-domain chain Add(x, bias) -> v; Mul(Mul(C, v), v) + B -> p; Tanh(v * p) + 1 -> q;
    # Mul(Mul(0.5, v), q) reproduces it bit for bit (C * (v * v) does not, by 1 ulp).
    case("FastGelu", "FastGelu", [X], ["y"]),
    case("FastGelu_bias", "FastGelu", [X, BIAS], ["y"]),

    # BiasGelu: C = Gelu(A + B), B 1-D [A.shape[-1]] (the kernel rejects any other bias
    # rank/size).  CPU kernel: v = a + b[h]; y = (v * 0.5f) * (erf(v * (1/sqrt2)) + 1).
    case("BiasGelu", "BiasGelu", [("a", SHAPE), BIAS], ["y"]),

    # QuickGelu: Y = X * Sigmoid(alpha * X), alpha default 1.702 (stored as float 1.702f).
    # CPU kernel: s = logistic(x * alpha) (MlasComputeLogistic; alpha == 1 skips the
    # multiply); y = x * s.
    case("QuickGelu", "QuickGelu", [X], ["y"]),
    case("QuickGelu_alpha1.5", "QuickGelu", [X], ["y"], {"alpha": 1.5}),

    # BiasAdd: Y = X + bias + skip (X, skip [N, S, C]; bias [C]).  ONNX Runtime has no CPU
    # kernel for it (CUDA and ROCm only; the CUDA kernel wants a 3-D X with C = 320, 640 or
    # 1280 and skip of X's shape), so the reference is numpy's, computed in that order.
    case("BiasAdd", "BiasAdd", [("x", BIAS_ADD_SHAPE), ("bias", BIAS_ADD_SHAPE[-1:]),
                                ("skip", BIAS_ADD_SHAPE)], ["y"], numpy_reference=bias_add_numpy),

    # SkipLayerNormalization(input, skip, gamma[, beta[, bias]]), epsilon default 1e-12
    # (float 1e-12f).  CPU kernel, per row of the last axis (hidden H):
    #   s = (input + skip) (+ bias), in that order  -> 4th output input_skip_bias_sum
    #   mean = mean(s); var = mean((s - mean)^2)   (population variance, Welford, in T)
    #   y = (s - mean) / sqrt(var + eps) * gamma (+ beta)
    #   mean output = mean, inv_std_var output = 1 / sqrt(var + eps), both float [.., 1].
    # Input order is (input, skip, gamma, beta, bias): bias is input 4, after beta; a bias
    # without beta needs "" at input 3.  input 2-D or 3-D; skip same shape, or [1, S, H] /
    # [S, H] against a 3-D input (indexed modulo its size); gamma/beta/bias 1-D [H].
    case("SkipLayerNormalization", "SkipLayerNormalization", SLN_IN, ["output"],
         {"epsilon": 1e-5}),
    case("SkipLayerNormalization_beta_eps1e-12", "SkipLayerNormalization",
         SLN_IN + [("beta", [HIDDEN])], ["output"], {"epsilon": 1e-12}),
    case("SkipLayerNormalization_beta_bias", "SkipLayerNormalization",
         SLN_IN + [("beta", [HIDDEN]), BIAS], SLN_OUT4, {"epsilon": 1e-5}),
    # epsilon left out: the schema default 1e-12 applies
    case("SkipLayerNormalization_default_eps", "SkipLayerNormalization", SLN_IN,
         ["output", "", "", "input_skip_bias_sum"]),
    # skip [S, H] broadcast over the batch
    case("SkipLayerNormalization_skip2d", "SkipLayerNormalization",
         [("input", SHAPE), ("skip", SHAPE[1:]), ("gamma", [HIDDEN]), ("beta", [HIDDEN])],
         ["output", "", "", "input_skip_bias_sum"], {"epsilon": 1e-5}),

    # SkipSimplifiedLayerNormalization(input, skip, gamma[, bias]) (no beta: bias is input 3).
    #   s = input + skip (+ bias)                  -> 4th output input_skip_bias_sum
    #   y = s / sqrt(mean(s^2) + eps) * gamma
    #   CPU kernel outputs mean = 0 (no centring), inv_std_var = 1 / sqrt(mean(s^2) + eps).
    case("SkipSimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", SLN_IN,
         ["output", "", "", "input_skip_bias_sum"], {"epsilon": 1e-6}),
    case("SkipSimplifiedLayerNormalization_bias", "SkipSimplifiedLayerNormalization",
         SLN_IN + [BIAS], SLN_OUT4, {"epsilon": 1e-6}),

    # SimplifiedLayerNormalization: registered in the DEFAULT domain (""), since version 1
    # (so any default-domain opset, 17 here, resolves it; onnx's checker does not know it).
    # Inputs (X, scale), outputs (Y, inv_std_var); attributes axis (default -1), epsilon
    # (default 1e-5), stash_type (default 1, float).  Over the axes [axis, rank):
    #   y = x / sqrt(mean(x^2) + eps) * scale;  inv_std_var = 1 / sqrt(mean(x^2) + eps),
    #   float, shape [d0 .. d(axis-1), 1 .. 1].  scale must hold exactly prod(d[axis:])
    #   elements (used flat, no broadcasting).  fp16: computed in float, rounded once.
    case("SimplifiedLayerNormalization", "SimplifiedLayerNormalization",
         [X, ("scale", [HIDDEN])], ["y", "inv_std_var"], {"axis": -1, "epsilon": 1e-6}, domain=""),
    case("SimplifiedLayerNormalization_axis1", "SimplifiedLayerNormalization",
         [X, ("scale", SHAPE[1:])], ["y", "inv_std_var"], {"axis": 1, "epsilon": 1e-6}, domain=""),

    # fp16.  SkipLayerNormalization has an fp16 CPU kernel: inputs widened to float, the
    # float computation above, output and input_skip_bias_sum rounded to fp16 once at the
    # end (the sum is NOT the fp16 sum of fp16 adds); mean/inv_std_var stay float.
    case("SkipLayerNormalization_beta_bias_fp16", "SkipLayerNormalization",
         SLN_IN + [("beta", [HIDDEN]), BIAS], SLN_OUT4, {"epsilon": 1e-5}, dtype="float16"),
    # FastGelu fp16 has no CPU kernel: ORT inlines the schema's function body, whose
    # constants are fp16 (a = 0.5, b = fp16(0.7978845608) = 0.7978515625,
    # c = fp16(0.035677) = 0.035675048828125, one = 1), then runs it in float (its
    # precision-free casts):  v = x (+ bias); y = a * (v * (one + tanh(v * (b + c * (v * v))))),
    # rounded to fp16 at the end.
    case("FastGelu_fp16", "FastGelu", [X], ["y"], dtype="float16"),
    case("FastGelu_bias_fp16", "FastGelu", [X, BIAS], ["y"], dtype="float16"),
]

ELEM = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}
FLOAT_STATS = {"mean", "inv_std_var"}  # type U of the layer norms: float whatever T is


def output_shape(c, name):
    """The first input's shape; the layer norms' statistics keep the leading axes, 1 after."""
    shape = list(c["inputs"][0][1])
    if name not in FLOAT_STATS:
        return shape
    axis = c["attributes"].get("axis", -1) % len(shape)
    return shape[:axis] + [1] * (len(shape) - axis)


def build(c) -> onnx.ModelProto:
    elem, _ = ELEM[c["dtype"]]
    node = helper.make_node(c["op"], [n for n, _ in c["inputs"]], c["node_outputs"],
                            domain=c["domain"], name=c["op"], **c["attributes"])
    inputs = [helper.make_tensor_value_info(n, elem, s) for n, s in c["inputs"]]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT if o in FLOAT_STATS else elem,
                                             output_shape(c, o))
               for o in c["node_outputs"] if o]
    graph = helper.make_graph([node], c["case"], inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="lora-graft tests/lowering.py")
    model.ir_version = 8  # opset 17's IR version
    if not (c["domain"] == "" and c["op"] == "SimplifiedLayerNormalization"):
        onnx.checker.check_model(model)  # the checker has no schema for that default-domain op
    return model


def feeds_for(c, seed):
    _, np_dtype = ELEM[c["dtype"]]
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np_dtype) for n, s in c["inputs"]}


def run_ort(model: onnx.ModelProto, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    manifest, failed = [], []
    for i, c in enumerate(CASES):
        try:
            model = build(c)
            feeds = feeds_for(c, 1000 + i)
            try:
                got = run_ort(model, feeds)
                reference = "onnxruntime"
            except Exception as e:  # noqa: BLE001
                if c["numpy_reference"] is None or "NOT_IMPLEMENTED" not in str(e):
                    raise
                got = c["numpy_reference"](feeds)
                reference = "numpy"
            outputs = [o for o in c["node_outputs"] if o]
            assert sorted(got) == sorted(outputs), (sorted(got), outputs)
            for name, v in got.items():
                want_dtype = np.float32 if name in FLOAT_STATS else ELEM[c["dtype"]][1]
                assert v.dtype == want_dtype, (name, v.dtype)
                assert np.all(np.isfinite(v)), f"{name} is not finite"
            onnx.save(model, str(out / f"{c['case']}.onnx"))
            tensors = {f"input.{k}": np.ascontiguousarray(v) for k, v in feeds.items()}
            tensors.update({f"output.{k}": np.ascontiguousarray(v) for k, v in got.items()})
            save_file(tensors, str(out / f"{c['case']}.io.safetensors"))
            manifest.append({"case": c["case"], "op": c["op"], "domain": c["domain"],
                             "inputs": [n for n, _ in c["inputs"]], "outputs": outputs,
                             "node_outputs": c["node_outputs"], "attributes": c["attributes"],
                             "dtype": c["dtype"], "reference": reference})
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in got.items())
            print(f"wrote {c['case']:40s} {c['domain'] or '(default)'}:{c['op']} {c['dtype']} "
                  f"[{reference}] -> {shapes}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, then fail
            failed.append(c["case"])
            print(f"FAIL  {c['case']}: {type(e).__name__}: {e}", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest)} cases written to {out}, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
