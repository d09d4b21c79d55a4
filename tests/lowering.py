"""Reference cases for lowering onnxruntime's com.microsoft contrib ops (needs onnx,
onnxruntime, numpy, safetensors).

    python tests/lowering.py OUT_DIR

For each case below: OUT_DIR/<case>.onnx, a model holding ONE contrib op (opsets: default
domain 17, com.microsoft 1; every op input, gamma/beta/bias included, is a graph input with
a fixed shape), and OUT_DIR/<case>.io.safetensors with `input.<name>` (seeded, normal) and
`output.<name>` as ONNX Runtime's CPU kernel computes them (graph optimizations off, one
thread).  float32, or float16 for the *_fp16 cases (SkipLayerNormalization's mean and
inv_std_var are float32 there too: the schema's type U is float only).  OUT_DIR/manifest.json
lists {"case", "op", "domain", "inputs", "outputs", "node_inputs", "node_outputs",
"attributes", "dtype", "reference"}; "inputs" and "outputs" are the graph's, "node_inputs" and
"node_outputs" the node's lists where "" marks an optional one left out, plus "output_dtypes"
({output: "int32"}) where an output is not of the case's dtype; "reference" is
"onnxruntime", or "numpy" where ONNX Runtime's CPU build has no kernel for the op (BiasAdd:
CUDA/ROCm only), with the formula below, or "onnxruntime, unpacked" where the CPU kernel
refuses a layout (MultiHeadAttention's packed QKV and KV) and runs the same tensors unpacked.  Cases whose ONNX Runtime outputs were also checked
against an independent numpy computation (GroupQueryAttention, RotaryEmbedding, Attention,
MultiHeadAttention, EmbedLayerNormalization) carry "checked_by": "numpy <max abs difference>".
Inputs are float (the case's dtype) except GroupQueryAttention's seqlens_k /
total_sequence_length (int32; the latter a scalar, shape []) and position_ids (int64 [B, S]);
its past_key / past_value have a zero-length axis ([B, kv_num_heads, 0, D], zero elements).
RotaryEmbedding's position_ids is int64 [B, S]; its cos/sin caches are fixed float32 inputs.
Attention's mask_index and MultiHeadAttention's key_padding_mask are fixed int32 inputs
([B, T] 0/1 or [B] lengths); Attention's weights a fixed float32 one.  EmbedLayerNormalization's
input_ids, segment_ids, mask and position_ids are fixed int32 inputs, and its mask_index OUTPUT
is int32 [B].

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
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

SHAPE = [2, 5, 16]
HIDDEN = SHAPE[-1]

# (name, shape) of inputs several cases share
X = ("x", SHAPE)
BIAS = ("bias", [HIDDEN])


def case(name, op, inputs, outputs, attributes=None, domain="com.microsoft", dtype="float32",
         numpy_reference=None, node_inputs=None, output_shapes=None, numpy_check=None,
         output_dtypes=None, initializers=None, fallback="numpy"):
    """`inputs`: [(name, shape)] graph inputs, seeded normal of `dtype`, or (name, shape, array)
    for a fixed value of its own dtype (int32 lengths, rotary caches); `outputs`: node outputs,
    "" for one left out; `node_inputs`: the node's input list where it differs from the graph
    inputs' names ("" for an optional input left out); `output_shapes`: {output: shape} where an
    output's shape is not the first input's; `output_dtypes`: {output: numpy dtype} where an
    output is not of the case's dtype (EmbedLayerNormalization's int32 mask_index);
    `numpy_check(feeds, attributes)`: an independent numpy computation ONNX Runtime's outputs
    must match (max abs difference <= 1e-4); `initializers`: {name: array} node inputs stored
    as initializers, not graph inputs (MatMulNBits' packed weights; numpy_check sees them in
    feeds); `numpy_reference(feeds)`: the outputs where ONNX Runtime's CPU kernel refuses the
    case, named `fallback` in the manifest."""
    return {"case": name, "op": op, "domain": domain, "inputs": inputs, "node_outputs": outputs,
            "attributes": attributes or {}, "dtype": dtype, "numpy_reference": numpy_reference,
            "node_inputs": node_inputs or [i[0] for i in inputs],
            "output_shapes": output_shapes or {}, "numpy_check": numpy_check,
            "output_dtypes": output_dtypes or {}, "initializers": initializers or {},
            "fallback": fallback}


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

# GroupQueryAttention, the prompt phase as onnxruntime-genai's decoders run it (the node in
# fixtures/genai_int4/model.onnx): num_heads 4 query heads, kv_num_heads 2 key/value heads,
# head size 16, batch 2, sequence 5, an empty KV cache (past_key/past_value [B, 2, 0, 16]:
# ONNX Runtime accepts zero-length past; leaving them out ("") gives the same outputs),
# seqlens_k = S - 1 per row (total valid length minus 1), total_sequence_length = S (int32
# scalar; a required input).  Checked against gqa_numpy below:
#   q [B, S, H*D] (or the first H*D columns of a packed query [B, S, (H + 2*KV)*D], then k,
#   then v), k, v [B, S, KV*D] -> BNSH heads.  Past length P = past_key.shape[2] (0 here).
#   do_rotary: positions p = P .. P+S-1, c = cos_cache[p], s = sin_cache[p] ([S, D/2]),
#   on q AND k (not v):  halves (rotary_interleaved=0): x1 = x[:D/2], x2 = x[D/2:],
#     out = [x1*c - x2*s, x2*c + x1*s];  interleaved: pairs (x[2i], x[2i+1]),
#     out[2i] = x[2i]*c[i] - x[2i+1]*s[i], out[2i+1] = x[2i+1]*c[i] + x[2i]*s[i].
#   present_key = concat(past_key, ROTATED k) on axis 2 [B, KV, P+S, D]; present_value =
#   concat(past_value, v).  Head h reads kv head h // (H / KV).  scores = scale * q k^T
#   (scale default 1/sqrt(D)); softcap > 0: scores = softcap * tanh(scores / softcap) (after
#   the scale, before the mask); causal mask key j <= P + i; softmax over keys; out = P v,
#   back to [B, S, H*D].
# Also seen in ONNX Runtime 1.32's CPU kernel (not in these cases): total_sequence_length must
# equal P + S here (6 or 8 with P = 0: INVALID_ARGUMENT; < S: rejected; shape [1] accepted);
# seqlens_k[b] must be < total_sequence_length (S - 1 is the largest); a smaller seqlens_k[b]
# = L - 1 right-pads row b: keys j <= min(i, L - 1), query rows >= L still computed, and
# present_key/value still hold all S new rows; cos_cache needs >= total_sequence_length rows
# (the kernel reads the cache at positions 0 .. S-1); do_rotary=1 without the caches fails,
# do_rotary=0 ignores them; scale=0.0 means the default 1/sqrt(D) (same outputs).
GQA_B, GQA_S, GQA_H, GQA_KV, GQA_D, GQA_MAX_SEQ = 2, 5, 4, 2, 16, 32


def genai_rotary_caches(max_seq, head_size, theta=10000.0):
    """cos/sin caches as onnxruntime-genai's model builder makes them: inv_freq =
    1 / theta^(arange(0, D, 2) / D), freqs = outer(arange(max_seq), inv_freq), float32
    ([max_seq, D/2]; the same formula gives fixtures/genai_int4's [128, 8] caches within
    6e-8)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_size, 2, dtype=np.int64).astype(np.float32)
                               / head_size)
    freqs = np.outer(np.arange(max_seq, dtype=np.float32), inv_freq).astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


GQA_COS, GQA_SIN = genai_rotary_caches(GQA_MAX_SEQ, GQA_D)


def gqa_rotary(x, cos, sin, interleaved):
    """x [B, N, S, D]; cos/sin [S, D/2] (already gathered at the tokens' positions)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x2 * cos + x1 * sin
        return out
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def gqa_numpy(feeds, attrs):
    """GroupQueryAttention from the op's documentation, in float64 (full rows: every
    seqlens_k[b] + 1 == past length + S), with what ONNX Runtime 1.32's CPU kernel does with
    local_window_size, position_ids and attention_bias (see the comments above the cases)."""
    nh, kvh = attrs["num_heads"], attrs["kv_num_heads"]
    f = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    q = f["query"]
    b, s, _ = q.shape
    if "key" in f:
        k, v = f["key"], f["value"]
        d = q.shape[-1] // nh
    else:  # packed QKV
        d = q.shape[-1] // (nh + 2 * kvh)
        q, k, v = q[..., :nh * d], q[..., nh * d:(nh + kvh) * d], q[..., (nh + kvh) * d:]
    q = q.reshape(b, s, nh, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, s, kvh, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, s, kvh, d).transpose(0, 2, 1, 3)
    past = f["past_key"].shape[2] if "past_key" in f else 0
    assert np.all(feeds["seqlens_k"] == past + s - 1), "full rows only"
    if attrs.get("do_rotary", 0):
        # prompt (past 0) with position_ids: ITS FIRST ELEMENT starts every row's positions
        start = int(feeds["position_ids"].flat[0]) if "position_ids" in feeds else past
        assert "position_ids" not in feeds or past == 0, "prompt only"
        pos = np.arange(start, start + s)
        cos, sin = f["cos_cache"][pos], f["sin_cache"][pos]
        q = gqa_rotary(q, cos, sin, attrs.get("rotary_interleaved", 0))
        k = gqa_rotary(k, cos, sin, attrs.get("rotary_interleaved", 0))
    if past:
        k = np.concatenate([f["past_key"], k], axis=2)
        v = np.concatenate([f["past_value"], v], axis=2)
    kk = np.repeat(k, nh // kvh, axis=1)  # query head h -> kv head h // (nh / kvh)
    vv = np.repeat(v, nh // kvh, axis=1)
    scores = attrs.get("scale", 1.0 / np.sqrt(d)) * (q @ kk.transpose(0, 1, 3, 2))
    cap = attrs.get("softcap", 0.0)
    if cap > 0:
        scores = cap * np.tanh(scores / cap)
    if "attention_bias" in f:  # [B or 1, H or 1, S, T], after the scale and the softcap
        scores = scores + f["attention_bias"]
    t = past + s
    query_pos, key_pos = past + np.arange(s)[:, None], np.arange(t)[None, :]
    causal = key_pos <= query_pos
    window = attrs.get("local_window_size", -1)
    if window > 0:  # the last `window` keys, the query's own included
        causal &= query_pos - key_pos < window
    scores = np.where(causal, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ vv).transpose(0, 2, 1, 3).reshape(b, s, nh * d)
    return {"output": out, "present_key": k, "present_value": v}


def gqa_case(name, packed, attributes, rotary, position_ids=None, attention_bias=None):
    """`position_ids`: an int64 [B, S] array for input 9; `attention_bias`: the shape of
    input 10 (seeded normal)."""
    b, s, h, kv, d = GQA_B, GQA_S, GQA_H, GQA_KV, GQA_D
    qkv = ([("query", [b, s, (h + 2 * kv) * d])] if packed else
           [("query", [b, s, h * d]), ("key", [b, s, kv * d]), ("value", [b, s, kv * d])])
    common = [("past_key", [b, kv, 0, d]), ("past_value", [b, kv, 0, d]),
              ("seqlens_k", [b], np.full([b], s - 1, dtype=np.int32)),
              ("total_sequence_length", [], np.array(s, dtype=np.int32))]
    caches = [("cos_cache", [GQA_MAX_SEQ, d // 2], GQA_COS),
              ("sin_cache", [GQA_MAX_SEQ, d // 2], GQA_SIN)] if rotary else []
    extra = ([("position_ids", [b, s], position_ids)] if position_ids is not None else []) + (
        [("attention_bias", attention_bias)] if attention_bias is not None else [])
    inputs = qkv + common + caches + extra
    node_inputs = ["query"] + (["", ""] if packed else ["key", "value"]) + [
        n for n, *_ in common + caches]
    if extra:  # inputs 7 .. 10: cos_cache, sin_cache, position_ids, attention_bias
        node_inputs += ["", ""] if not rotary else []
        node_inputs += ["position_ids" if position_ids is not None else ""]
        node_inputs += ["attention_bias"] if attention_bias is not None else []
    outputs = ["output", "present_key", "present_value"]
    shapes = {"output": [b, s, h * d], "present_key": [b, kv, s, d],
              "present_value": [b, kv, s, d]}
    return case(name, "GroupQueryAttention", inputs, outputs,
                {"num_heads": h, "kv_num_heads": kv, **attributes}, node_inputs=node_inputs,
                output_shapes=shapes, numpy_check=gqa_numpy)


GQA_GENAI = {"scale": 0.25, "local_window_size": -1, "softcap": 0.0, "do_rotary": 1}
CASES += [
    # the node of fixtures/genai_int4/model.onnx: packed QKV, rotary (halves), scale 0.25
    gqa_case("gqa_packed_rotary", True, {**GQA_GENAI, "rotary_interleaved": 0}, rotary=True),
    # separate q/k/v, no rotary, scale left out (1/sqrt(D))
    gqa_case("gqa_separate", False, {"do_rotary": 0}, rotary=False),
    gqa_case("gqa_rotary_interleaved", True, {**GQA_GENAI, "rotary_interleaved": 1},
             rotary=True),
    gqa_case("gqa_softcap", False, {"do_rotary": 0, "softcap": 30.0}, rotary=False),
]

# RotaryEmbedding (com.microsoft, since 1): inputs (input, position_ids, cos_cache,
# sin_cache), output `output` of input's shape; attributes interleaved, num_heads,
# rotary_embedding_dim, scale, is_packed_batching (all optional, default 0 / 1.0).  input is
# [B, S, N*H] (3-D; num_heads gives N) or [B, N, S, H] (4-D, BNSH); position_ids int64
# [B, S] (or [1]: a start offset); cos_cache/sin_cache [max_seq, H/2] (full rotary here).
# Checked against rotary_numpy below:  per batch row b and token s, c = cos_cache[pos[b, s]],
# s = sin_cache[pos[b, s]] ([H/2]), applied to EVERY head's H values (a 3-D input is
# [B, S, N, H]) with gqa_rotary's halves / interleaved formula.
# Also seen in ONNX Runtime 1.32's CPU kernel (not in these cases): a 3-D input without
# num_heads gives the same outputs (head size = 2 * cache width); position_ids of shape [1]
# = [p0] acts as positions p0 .. p0+S-1 for every row.
# scale and is_packed_batching: the CPU kernel ignores both (outputs of rotary_3d_scale2 and
# rotary_3d_packed_batching are those of the plain formula; scale 0.5 and 0.0 tried too, 4-D
# too: `scale` multiplies neither the output nor the angles).  is_packed_batching=1 with a 2-D
# [tokens, hidden] input is rejected ("Input 'x' is expected to have 3 or 4 dimensions"); a
# [1, B*S, hidden] input with position_ids [1, B*S] is plain 3-D rotary.
ROT_B, ROT_S, ROT_N, ROT_H, ROT_MAX_SEQ = 2, 5, 4, 16, 32
ROT_POS = np.stack([np.arange(0, ROT_S), np.arange(3, 3 + ROT_S)]).astype(np.int64)
ROT_COS, ROT_SIN = genai_rotary_caches(ROT_MAX_SEQ, ROT_H)


def rotary_numpy(feeds, attrs):
    """RotaryEmbedding in float64, full rotary (cache width == head size / 2)."""
    x = feeds["input"].astype(np.float64)
    pos = feeds["position_ids"]
    seq = x.shape[1] if x.ndim == 3 else x.shape[2]
    if pos.ndim == 1:  # [1]: a start offset for every row
        pos = (pos[0] + np.arange(seq))[None, :]
    cos = feeds["cos_cache"].astype(np.float64)[pos][:, None]  # [B, 1, S, H/2]
    sin = feeds["sin_cache"].astype(np.float64)[pos][:, None]
    if x.ndim == 3:
        b, s, hidden = x.shape
        # Without num_heads the head size is twice the cache width.
        n = attrs.get("num_heads") or hidden // (2 * feeds["cos_cache"].shape[1])
        x4 = x.reshape(b, s, n, hidden // n).transpose(0, 2, 1, 3)
    else:
        x4 = x
    out = gqa_rotary(x4, cos, sin, attrs.get("interleaved", 0))
    if x.ndim == 3:
        out = out.transpose(0, 2, 1, 3).reshape(x.shape)
    return {"output": out}


def rotary_case(name, shape, attributes, pos=ROT_POS):
    inputs = [("input", shape), ("position_ids", list(pos.shape), pos),
              ("cos_cache", [ROT_MAX_SEQ, ROT_H // 2], ROT_COS),
              ("sin_cache", [ROT_MAX_SEQ, ROT_H // 2], ROT_SIN)]
    return case(name, "RotaryEmbedding", inputs, ["output"], attributes,
                numpy_check=rotary_numpy)


CASES += [
    rotary_case("rotary_3d", [ROT_B, ROT_S, ROT_N * ROT_H],
                {"num_heads": ROT_N, "interleaved": 0}),
    rotary_case("rotary_3d_interleaved", [ROT_B, ROT_S, ROT_N * ROT_H],
                {"num_heads": ROT_N, "interleaved": 1}),
    rotary_case("rotary_4d", [ROT_B, ROT_N, ROT_S, ROT_H], {"interleaved": 0}),
    rotary_case("rotary_3d_scale2", [ROT_B, ROT_S, ROT_N * ROT_H],
                {"num_heads": ROT_N, "interleaved": 0, "scale": 2.0}),
    rotary_case("rotary_3d_packed_batching", [ROT_B, ROT_S, ROT_N * ROT_H],
                {"num_heads": ROT_N, "interleaved": 0, "is_packed_batching": 1}),
]
CASES += [
    rotary_case("rotary_3d_no_num_heads", [ROT_B, ROT_S, ROT_N * ROT_H], {"interleaved": 0}),
    rotary_case("rotary_start_offset", [ROT_B, ROT_N, ROT_S, ROT_H], {"interleaved": 1},
                pos=np.array([4], dtype=np.int64)),
]

# GroupQueryAttention's sliding window, position_ids and attention_bias, as ONNX Runtime
# 1.32's CPU kernel computes them (gqa_numpy above):
# local_window_size W > 0: query i (absolute position P + i) sees key j iff
#   P + i - W < j <= P + i, i.e. its W most recent keys, its own included (W = 1: itself only;
#   W keys, NOT W + 1).  W = 1, 2, 3 checked; W >= P + S is no window; the default -1 means no
#   window; W = 0 (seen, not in these cases) lets a query see no key: its output row is all 0.
#   The window goes with the causal mask (excluded keys: probability exactly 0), after the
#   scale, softcap and attention_bias.
# position_ids (input 9, int64 [B, S]; read only with do_rotary=1): in the prompt (empty past)
#   the kernel reads ONE value, p0 = position_ids[0, 0] (the tensor's first element), and
#   rotates q and k of EVERY batch row at positions p0 .. p0+S-1; the other entries, row 1's
#   first included, are ignored (gqa_position_ids: row 1 holds 0 .. 4, present_key row 1 is
#   rotated at 2 .. 6).  Without position_ids the positions are P .. P+S-1.  (Rows shifted
#   uniformly give the same `output`, RoPE being relative; present_key tells them apart.)
# attention_bias (input 10, [B or 1, num_heads or 1, S, T], T = total_sequence_length):
#   added to the scores after the scale AND after the softcap:
#   scores = softcap * tanh(scale * q k^T / softcap) + attention_bias (bias before the
#   softcap does not match), then the causal/window mask; dims of 1 broadcast ([1, H, S, T],
#   [B, H, S, T], [B, 1, S, T], [1, 1, S, T] all accepted).
GQA_POS = np.stack([np.arange(2, 2 + GQA_S), np.arange(0, GQA_S)]).astype(np.int64)
CASES += [
    gqa_case("gqa_local_window", False, {"do_rotary": 0, "local_window_size": 2}, rotary=False),
    gqa_case("gqa_local_window_rotary", True, {**GQA_GENAI, "local_window_size": 3,
                                               "rotary_interleaved": 0}, rotary=True),
    gqa_case("gqa_position_ids", True, {**GQA_GENAI, "rotary_interleaved": 0}, rotary=True,
             position_ids=GQA_POS),
    gqa_case("gqa_attention_bias", False, {"do_rotary": 0},
             rotary=False, attention_bias=[GQA_B, 1, GQA_S, GQA_S]),
    gqa_case("gqa_attention_bias_softcap_window", False,
             {"do_rotary": 0, "scale": 0.3, "softcap": 2.0, "local_window_size": 3},
             rotary=False, attention_bias=[1, GQA_H, GQA_S, GQA_S]),
]

# Attention and MultiHeadAttention, as ONNX Runtime 1.32's CPU kernels compute them (batch 2,
# sequence 5, hidden 16, 2 heads of 8).  Both share attention_core below:
#   scores = scale * q k^T + M + attention_bias  (attention_bias added unscaled, after the
#   scale; scale default 1/sqrt(q/k head size), scale=0 the same), softmax over the keys,
#   out = P v, heads back to [B, S, N * dv] (head h = columns h*d .. h*d+d-1).
#   M [B, 1, S, T] (T = key length, no past here): 0 for a kept key, mask_filter_value
#   (default -10000.0) ADDED for a masked one (not -inf, not the type's lowest: with a small
#   mask_filter_value, -3 here, masked keys keep some weight), from the int32 mask:
#     2-D [B, T] raw mask: key j of row b masked iff mask[b, j] <= 0 (1, 2, 3 keep; 0, -1 mask);
#     1-D [B] right-padding lengths: key j masked iff j >= mask[b] (a length > T masks none);
#     also seen, not in these cases: 1-D [2B] (Attention) = B exclusive ends then B inclusive
#     starts, masked iff j >= end[b] or j < start[b]; 3-D [B, S, T] raw per query row (<= 0
#     masks); Attention's 4-D [B, 1, M, M] is rejected on CPU ("4D mask in attention cpu kernel
#     is not supported").
#   unidirectional=1: key j > i is EXCLUDED (probability exactly 0, as -inf, whatever
#     mask_filter_value is) for the query rows i < S - 1 only (the kernel's loop stops before
#     the last row: with T = S that row has no later key anyway).  On top of M: in
#     *_unidirectional_mask row 1's key 0 is padded, and its query 0, whose only causal key it
#     is, still puts all its weight on it.
ATT_B, ATT_S, ATT_HIDDEN, ATT_N = 2, 5, 16, 2
ATT_RAW_MASK = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 0, 1]], dtype=np.int32)  # row 1: holes
ATT_LENGTHS = np.array([5, 3], dtype=np.int32)
ATT_BIAS_INPUTS = ["", "", "attention_bias"]  # (mask_index or key_padding_mask), past, bias


def attention_mask_numpy(mask, b, s, t, filter_value):
    """An int32 mask_index / key_padding_mask -> the additive M [B, 1, S, T]."""
    key = np.arange(t)
    if mask.ndim == 1 and mask.shape[0] == b:  # right padding: valid lengths
        keep = np.broadcast_to((key[None, :] < mask[:, None])[:, None, :], (b, s, t))
    elif mask.ndim == 1 and mask.shape[0] == 2 * b:  # exclusive ends, inclusive starts
        keep = (key[None, :] < mask[:b, None]) & (key[None, :] >= mask[b:, None])
        keep = np.broadcast_to(keep[:, None, :], (b, s, t))
    elif mask.ndim == 2:  # raw [B, T]
        keep = np.broadcast_to((mask > 0)[:, None, :], (b, s, t))
    else:  # raw [B, S, T]
        keep = mask > 0
    return np.where(keep, 0.0, filter_value)[:, None]


def attention_core(q, k, v, attrs, mask=None, attention_bias=None):
    """q [B, S, N*d], k [B, T, N*d], v [B, T, N*dv] (float64) -> [B, S, N*dv]."""
    n = attrs["num_heads"]
    (b, s, _), t = q.shape, k.shape[1]
    d, dv = q.shape[-1] // n, v.shape[-1] // n
    q = q.reshape(b, s, n, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, t, n, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, t, n, dv).transpose(0, 2, 1, 3)
    scores = (attrs.get("scale") or 1.0 / np.sqrt(d)) * (q @ k.transpose(0, 1, 3, 2))
    if mask is not None:
        scores = scores + attention_mask_numpy(mask, b, s, t,
                                               attrs.get("mask_filter_value", -10000.0))
    if attention_bias is not None:
        scores = scores + attention_bias.astype(np.float64)
    if attrs.get("unidirectional", 0):
        i, j = np.arange(s)[:, None], np.arange(t)[None, :]
        scores = np.where((i < s - 1) & (j > i), -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, s, n * dv)


def attention_numpy(feeds, attrs):
    """Attention: the merged input projection, then attention_core."""
    f = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    qkv = f["input"] @ f["weights"] + f.get("bias", 0.0)
    hq, hk, _ = attrs.get("qkv_hidden_sizes", [qkv.shape[-1] // 3] * 3)
    q, k, v = qkv[..., :hq], qkv[..., hq:hq + hk], qkv[..., hq + hk:]
    return {"output": attention_core(q, k, v, attrs, f.get("mask_index"),
                                     f.get("attention_bias"))}


# weights: a fixed normal * 0.25, so the scores stay O(1) and the softmax is not one-hot
ATT_WEIGHTS = (np.random.default_rng(7).normal(size=[ATT_HIDDEN, 3 * ATT_HIDDEN]) * 0.25
               ).astype(np.float32)


def attention_case(name, attributes, extra=(), node_extra=None, hidden_sizes=None):
    """`extra`: inputs after (input, weights, bias); `node_extra`: the node's inputs after
    bias where they are not `extra`'s names (\"\" for one left out)."""
    hq, hk, hv = hidden_sizes or [ATT_HIDDEN] * 3
    b, s = ATT_B, ATT_S
    weights = (ATT_WEIGHTS if hidden_sizes is None else
               (np.random.default_rng(8).normal(size=[ATT_HIDDEN, hq + hk + hv]) * 0.25
                ).astype(np.float32))
    inputs = [("input", [b, s, ATT_HIDDEN]), ("weights", list(weights.shape), weights),
              ("bias", [hq + hk + hv])] + list(extra)
    node_inputs = ["input", "weights", "bias"] + (
        node_extra if node_extra is not None else [i[0] for i in extra])
    attrs = {"num_heads": ATT_N, **attributes}
    if hidden_sizes is not None:
        attrs["qkv_hidden_sizes"] = list(hidden_sizes)
    return case(name, "Attention", inputs, ["output"], attrs, node_inputs=node_inputs,
                output_shapes={"output": [b, s, hv]}, numpy_check=attention_numpy)


# Attention (com.microsoft; what onnxruntime's transformer optimizer fuses BERT's / GPT-2's
# self-attention into): inputs (input [B, S, H_in], weights [H_in, Hq + Hk + Hv], bias
# [Hq + Hk + Hv] (optional), mask_index int32 (3), past (4), attention_bias (5),
# past_sequence_length (6)); outputs (output [B, S, Hv], present (left out here)); attributes
# num_heads (required), qkv_hidden_sizes [Hq, Hk, Hv] (default the weights' columns / 3 each;
# Hq == Hk), scale (default 1/sqrt(Hq / num_heads)), mask_filter_value (default -10000.0),
# unidirectional (default 0).  Checked against attention_numpy:
#   qkv = input @ weights + bias; q, k, v = its column blocks [0, Hq), [Hq, Hq + Hk),
#   [Hq + Hk, end); then attention_core above (T = S).  qkv_hidden_sizes [16, 16, 8]: v heads
#   of 4, output [B, S, 8]; [8, 8, 16] (q/k heads of 4: default scale 1/sqrt(4)) works too.
CASES += [
    attention_case("attention", {}),
    attention_case("attention_mask_raw", {},
                   [("mask_index", [ATT_B, ATT_S], ATT_RAW_MASK)]),
    attention_case("attention_mask_lengths", {},
                   [("mask_index", [ATT_B], ATT_LENGTHS)]),
    attention_case("attention_unidirectional", {"unidirectional": 1}),
    attention_case("attention_unidirectional_mask", {"unidirectional": 1,
                                                     "mask_filter_value": -3.0},
                   [("mask_index", [ATT_B, ATT_S], ATT_RAW_MASK)]),
    attention_case("attention_scale_mask_filter", {"scale": 0.3, "mask_filter_value": -3.0},
                   [("mask_index", [ATT_B, ATT_S], ATT_RAW_MASK)]),
    attention_case("attention_qkv_hidden_sizes", {}, hidden_sizes=[16, 16, 8]),
    attention_case("attention_bias", {},
                   [("attention_bias", [1, ATT_N, ATT_S, ATT_S])], ATT_BIAS_INPUTS),
    attention_case("attention_bias_mask", {"scale": 0.3, "mask_filter_value": -3.0},
                   [("mask_index", [ATT_B, ATT_S], ATT_RAW_MASK),
                    ("attention_bias", [ATT_B, 1, ATT_S, ATT_S])],
                   ["mask_index", "", "attention_bias"]),
]

# MultiHeadAttention (com.microsoft): inputs (query [B, S, D], key [B, L, D], value
# [B, L, Dv], bias [D + D + Dv] (3), key_padding_mask int32 (4), attention_bias (5), past_key
# (6), past_value (7), past_sequence_length (8), cache_indirection (9)); outputs (output
# [B, S, Dv], present_key, present_value, qk (left out here)); attributes num_heads
# (required), scale (default 1/sqrt(D / num_heads)), mask_filter_value (default -10000.0),
# unidirectional (default 0).  Separate q/k/v only here (query 5 rows, key/value 6 rows:
# cross attention).  Checked against mha_numpy:
#   q = query + bias[:D], k = key + bias[D:2D], v = value + bias[2D:] (no projection), then
#   attention_core above with key_padding_mask as its mask ([B, L] raw, [B] lengths; [B, S, L]
#   raw also seen) and attention_bias [B or 1, N or 1, S, L].
#   unidirectional=1, as Attention's: key j > i excluded for query rows i < S - 1 — with L > S
#   the LAST query row then sees all L keys and the others keys 0 .. i (seen with L = 6, 7:
#   neither corner-aligned causal mask); mha_unidirectional uses L = S,
#   mha_unidirectional_longer_keys L = 6 > S = 5.
MHA_L = 6
MHA_RAW_MASK = np.array([[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1]], dtype=np.int32)
MHA_LENGTHS = np.array([6, 4], dtype=np.int32)


def mha_numpy(feeds, attrs):
    f = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    q, k, v = f["query"], f["key"], f["value"]
    if "bias" in f:
        d = q.shape[-1]
        q, k, v = q + f["bias"][:d], k + f["bias"][d:2 * d], v + f["bias"][2 * d:]
    return {"output": attention_core(q, k, v, attrs, f.get("key_padding_mask"),
                                     f.get("attention_bias"))}


def mha_inputs(qkv, bias, extra):
    """The graph inputs and the node's input list of a MultiHeadAttention case: `qkv` the
    (name, shape) of its query/key/value inputs present, the bias [3 D] when `bias`, and
    `extra`: (input index, (name, shape[, array])) for inputs 4 and 5."""
    inputs = list(qkv)
    node_inputs = [i[0] for i in inputs] + [""] * (3 - len(inputs))
    node_inputs.append("bias" if bias else "")
    if bias:
        inputs.append(("bias", [3 * ATT_HIDDEN]))
    for index, spec in extra:
        node_inputs += [""] * (index - len(node_inputs)) + [spec[0]]
        inputs.append(spec)
    while node_inputs[-1] == "":
        node_inputs.pop()
    return inputs, node_inputs


def mha_case(name, attributes, bias=False, extra=(), length=MHA_L):
    """Separate query, key and value; `extra` as mha_inputs'."""
    b, s, d = ATT_B, ATT_S, ATT_HIDDEN
    inputs, node_inputs = mha_inputs(
        [("query", [b, s, d]), ("key", [b, length, d]), ("value", [b, length, d])], bias, extra)
    return case(name, "MultiHeadAttention", inputs, ["output"],
                {"num_heads": ATT_N, **attributes}, node_inputs=node_inputs,
                output_shapes={"output": [b, s, d]}, numpy_check=mha_numpy)


CASES += [
    mha_case("mha", {}),
    mha_case("mha_bias", {}, bias=True),
    mha_case("mha_key_padding_mask", {"mask_filter_value": -3.0}, bias=True,
             extra=[(4, ("key_padding_mask", [ATT_B, MHA_L], MHA_RAW_MASK))]),
    mha_case("mha_key_padding_lengths", {},
             extra=[(4, ("key_padding_mask", [ATT_B], MHA_LENGTHS))]),
    mha_case("mha_attention_bias", {},
             extra=[(5, ("attention_bias", [1, ATT_N, ATT_S, MHA_L]))]),
    mha_case("mha_attention_bias_mask_scale", {"scale": 0.4, "mask_filter_value": -3.0},
             bias=True, extra=[(4, ("key_padding_mask", [ATT_B, MHA_L], MHA_RAW_MASK)),
                               (5, ("attention_bias", [ATT_B, 1, ATT_S, MHA_L]))]),
    mha_case("mha_unidirectional", {"unidirectional": 1}, bias=True, length=ATT_S),
    mha_case("mha_unidirectional_longer_keys", {"unidirectional": 1}, bias=True),
    mha_case("mha_unidirectional_mask", {"unidirectional": 1, "mask_filter_value": -3.0},
             extra=[(4, ("key_padding_mask", [ATT_B, ATT_S], ATT_RAW_MASK))], length=ATT_S),
]

# MultiHeadAttention's other layouts of key and value (ONNX Runtime 1.32):
#   key, value [B, N, L, H] (BNSH, already split into heads): the CPU kernel runs it; the
#   bias then applies to the query only (bias[D:] is ignored: checked, adding it moves the
#   output by O(1)).  Checked against mha_numpy on key/value back in [B, L, D].
#   packed QKV, query [B, S, N, 3, H] with key and value left out, and packed KV, key
#   [B, L, N, 2, H] with value left out: the CPU kernel refuses both ("not implemented for
#   CPU"; CUDA only), so the reference is ONNX Runtime's CPU kernel on the same tensors
#   unpacked into separate query/key/value [B, S or L, N*H] (q = query[:, :, :, 0], ...;
#   the CUDA kernels' AddBiasTranspose reads the bias as q|k|v, each [N, H], as for
#   separate inputs).  mha_numpy checks those too.
MHA_HEAD = ATT_HIDDEN // ATT_N


def mha_unpack(feeds):
    """Separate query/key/value [B, S or L, N*H] from a packed or BNSH case's feeds, and
    the bias as the separate-input kernel applies it."""
    f = dict(feeds)
    q = f["query"]
    if q.ndim == 5:  # [B, S, N, 3, H]
        b, s = q.shape[:2]
        f["query"], f["key"], f["value"] = (q[:, :, :, i].reshape(b, s, -1) for i in range(3))
    elif f["key"].ndim == 5:  # [B, L, N, 2, H]
        kv = f["key"]
        b, l = kv.shape[:2]
        f["key"], f["value"] = (kv[:, :, :, i].reshape(b, l, -1) for i in range(2))
    else:  # [B, N, L, H]: the bias is the query's only
        f["key"], f["value"] = (f[k].transpose(0, 2, 1, 3).reshape(f[k].shape[0], -1,
                                f[k].shape[1] * f[k].shape[3]) for k in ("key", "value"))
        if "bias" in f:
            d = q.shape[-1]
            f["bias"] = np.concatenate([f["bias"][:d], np.zeros(2 * d, f["bias"].dtype)])
    return {k: np.ascontiguousarray(v) for k, v in f.items()}


def mha_layout_numpy(feeds, attrs):
    return mha_numpy(mha_unpack(feeds), attrs)


def mha_unpacked_ort(attributes):
    """The reference for the layouts the CPU kernel refuses: its kernel on the unpacked
    tensors."""
    def reference(feeds):
        f = mha_unpack(feeds)
        names = ["query", "key", "value", "bias", "key_padding_mask", "attention_bias"]
        node_inputs = [n if n in f else "" for n in names]
        while node_inputs[-1] == "":
            node_inputs.pop()
        c = case("unpacked", "MultiHeadAttention",
                 [(n, list(f[n].shape), f[n]) for n in node_inputs if n], ["output"],
                 {"num_heads": ATT_N, **attributes}, node_inputs=node_inputs,
                 output_shapes={"output": list(f["query"].shape)})
        return run_ort(build(c), {n: f[n] for n in node_inputs if n})
    return reference


def mha_layout_case(name, layout, attributes, bias=False, extra=()):
    """`layout`: "bnsh" (key, value [B, N, L, H]), "packed_qkv" or "packed_kv"."""
    b, s, l, n, h, d = ATT_B, ATT_S, MHA_L, ATT_N, MHA_HEAD, ATT_HIDDEN
    inputs, node_inputs = mha_inputs({
        "bnsh": [("query", [b, s, d]), ("key", [b, n, l, h]), ("value", [b, n, l, h])],
        "packed_qkv": [("query", [b, s, n, 3, h])],
        "packed_kv": [("query", [b, s, d]), ("key", [b, l, n, 2, h])],
    }[layout], bias, extra)
    refused = layout != "bnsh"
    return case(name, "MultiHeadAttention", inputs, ["output"], {"num_heads": n, **attributes},
                node_inputs=node_inputs, output_shapes={"output": [b, s, d]},
                numpy_check=mha_layout_numpy,
                numpy_reference=mha_unpacked_ort(attributes) if refused else None,
                fallback="onnxruntime, unpacked")


CASES += [
    mha_layout_case("mha_bnsh_kv", "bnsh", {}),
    mha_layout_case("mha_bnsh_kv_bias_mask", "bnsh", {"mask_filter_value": -3.0}, bias=True,
                    extra=[(4, ("key_padding_mask", [ATT_B, MHA_L], MHA_RAW_MASK)),
                           (5, ("attention_bias", [1, ATT_N, ATT_S, MHA_L]))]),
    mha_layout_case("mha_packed_qkv", "packed_qkv", {}),
    mha_layout_case("mha_packed_qkv_bias_unidirectional", "packed_qkv", {"unidirectional": 1},
                    bias=True),
    mha_layout_case("mha_packed_kv_bias_mask", "packed_kv", {"scale": 0.4}, bias=True,
                    extra=[(4, ("key_padding_mask", [ATT_B], MHA_LENGTHS))]),
]

# EmbedLayerNormalization (com.microsoft): inputs (input_ids int32 [B, S], segment_ids int32
# [B, S] (1, optional), word_embedding [V, H], position_embedding [P, H], segment_embedding
# [G, H] (4, optional: with segment_ids; segment_ids without it is rejected), gamma [H], beta
# [H], mask int32 [B, S] (7, optional), position_ids int32 [B, S] or [1, S] (8, optional));
# outputs (output [B, S, H], mask_index int32 [B], embedding_sum [B, S, H] (2, optional));
# attribute epsilon (default 1e-12, float 1e-12f).  Checked against embed_ln_numpy:
#   e = word_embedding[input_ids] + position_embedding[pos] (+ segment_embedding[segment_ids]),
#   added in that order in float; pos = position_ids (a [1, S] one for every row), without it
#   arange(S) for every row;  embedding_sum = e (before the normalization);
#   output = (e - mean) / sqrt(var + epsilon) * gamma + beta over H (population variance);
#   mask_index[b] = the number of entries of mask[b, :] EQUAL to 1 (a count, not the first
#   0's position: [1, 0, 1, 1, 0] gives 3; [1, 2, 1, 1, 0] gives 3 too), all 0 without mask.
# Also seen: the node needs its output 1 listed (a name or ""): with `output` alone the
# op's shape inference fails ("output index 1 is out of range").
ELN_B, ELN_S, ELN_H, ELN_V, ELN_P = 2, 5, 16, 11, 8
ELN_IDS = np.array([[1, 5, 10, 0, 3], [7, 7, 2, 9, 4]], dtype=np.int32)
ELN_SEGMENTS = np.array([[0, 0, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=np.int32)
ELN_MASK = np.array([[1, 1, 1, 1, 0], [1, 0, 1, 1, 0]], dtype=np.int32)
ELN_POS = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 7, 6]], dtype=np.int32)


def embed_ln_numpy(feeds, attrs, outputs):
    f = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    b, s = f["input_ids"].shape
    pos = f.get("position_ids", np.arange(s)[None, :])
    e = f["word_embedding"][f["input_ids"]] + f["position_embedding"][np.broadcast_to(pos, (b, s))]
    if "segment_embedding" in f:
        e = e + f["segment_embedding"][f["segment_ids"]]
    mean = e.mean(-1, keepdims=True)
    var = ((e - mean) ** 2).mean(-1, keepdims=True)
    out = {"output": (e - mean) / np.sqrt(var + attrs.get("epsilon", 1e-12)) * f["gamma"] +
           f["beta"], "embedding_sum": e,
           "mask_index": ((f["mask"] == 1).sum(-1) if "mask" in f else np.zeros(b)
                          ).astype(np.int32)}
    return {k: out[k] for k in outputs if k}


def embed_ln_case(name, attributes, segments=True, mask=True, position_ids=None,
                  outputs=("output", "mask_index")):
    b, s, h = ELN_B, ELN_S, ELN_H
    named = {"input_ids": ("input_ids", [b, s], ELN_IDS),
             "segment_ids": ("segment_ids", [b, s], ELN_SEGMENTS) if segments else None,
             "word_embedding": ("word_embedding", [ELN_V, h]),
             "position_embedding": ("position_embedding", [ELN_P, h]),
             "segment_embedding": ("segment_embedding", [2, h]) if segments else None,
             "gamma": ("gamma", [h]), "beta": ("beta", [h]),
             "mask": ("mask", [b, s], ELN_MASK) if mask else None,
             "position_ids": (("position_ids", list(position_ids.shape), position_ids)
                              if position_ids is not None else None)}
    node_inputs = [n if spec is not None else "" for n, spec in named.items()]
    while node_inputs[-1] == "":
        node_inputs.pop()
    inputs = [spec for spec in named.values() if spec is not None]
    return case(name, "EmbedLayerNormalization", inputs, list(outputs), attributes,
                node_inputs=node_inputs,
                output_shapes={"output": [b, s, h], "mask_index": [b], "embedding_sum": [b, s, h]},
                output_dtypes={"mask_index": np.int32},
                numpy_check=lambda feeds, attrs: embed_ln_numpy(feeds, attrs, outputs))


CASES += [
    embed_ln_case("embed_ln_segments_mask", {"epsilon": 1e-12}),
    embed_ln_case("embed_ln_no_segments_no_mask", {"epsilon": 1e-5}, segments=False,
                  mask=False),
    embed_ln_case("embed_ln_position_ids", {"epsilon": 1e-12}, position_ids=ELN_POS),
    embed_ln_case("embed_ln_position_ids_1s", {"epsilon": 1e-12}, segments=False,
                  position_ids=ELN_POS[1:] - 2),
    # epsilon left out: the default 1e-12
    embed_ln_case("embed_ln_embedding_sum", {},
                  outputs=("output", "mask_index", "embedding_sum")),
    embed_ln_case("embed_ln_embedding_sum_only", {"epsilon": 1e-12}, mask=False,
                  outputs=("output", "", "embedding_sum")),
]


ELEM = {"float32": (TensorProto.FLOAT, np.float32), "float16": (TensorProto.FLOAT16, np.float16)}
FLOAT_STATS = {"mean", "inv_std_var"}  # type U of the layer norms: float whatever T is


def output_shape(c, name):
    """The first input's shape; the layer norms' statistics keep the leading axes, 1 after."""
    if name in c["output_shapes"]:
        return list(c["output_shapes"][name])
    shape = list(c["inputs"][0][1])
    if name not in FLOAT_STATS:
        return shape
    axis = c["attributes"].get("axis", -1) % len(shape)
    return shape[:axis] + [1] * (len(shape) - axis)


def output_dtype(c, name):
    """numpy dtype of an output: `output_dtypes`'s, float for the layer norms' statistics, else
    the case's dtype."""
    if name in c["output_dtypes"]:
        return np.dtype(c["output_dtypes"][name])
    return np.dtype(np.float32) if name in FLOAT_STATS else np.dtype(ELEM[c["dtype"]][1])


def build(c) -> onnx.ModelProto:
    elem, _ = ELEM[c["dtype"]]
    node = helper.make_node(c["op"], c["node_inputs"], c["node_outputs"],
                            domain=c["domain"], name=c["op"], **c["attributes"])
    inputs = [helper.make_tensor_value_info(
        i[0], helper.np_dtype_to_tensor_dtype(i[2].dtype) if len(i) > 2 else elem, i[1])
        for i in c["inputs"]]
    outputs = [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(output_dtype(c, o)),
                                             output_shape(c, o))
               for o in c["node_outputs"] if o]
    graph = helper.make_graph([node], c["case"], inputs, outputs,
                              initializer=[numpy_helper.from_array(v, k)
                                           for k, v in c["initializers"].items()])
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
    return {i[0]: i[2] if len(i) > 2 else rng.normal(size=i[1]).astype(np_dtype)
            for i in c["inputs"]}


def run_ort(model: onnx.ModelProto, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def compare(a_path, b_path, io_path, tol):
    """`lowering.py compare A.onnx B.onnx IO TOL`: ONNX Runtime runs both models on IO's
    inputs; every output of B is within TOL (relative to its largest value) of A's."""
    from safetensors.numpy import load_file

    io = load_file(io_path)
    feeds = {k[len("input."):]: v for k, v in io.items() if k.startswith("input.")}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    a = ort.InferenceSession(a_path, opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(b_path, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in a.get_outputs()]
    for name, x, y in zip(names, a.run(names, feeds), b.run(names, feeds)):
        d = float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
        rel = d / max(1e-30, float(np.max(np.abs(x), initial=0.0)))
        print(f"{name}: {rel:.3g} relative")
        if rel > tol:
            sys.exit(f"{name}: {rel:.3g} relative from {a_path}'s (tolerance {tol})")
    print("same outputs")


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
        return
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR | compare A.onnx B.onnx IO TOL")
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
                refused = any(t in str(e).lower() for t in ("not_implemented", "not implemented"))
                if c["numpy_reference"] is None or not refused:
                    raise
                got = c["numpy_reference"](feeds)
                reference = c["fallback"]
            outputs = [o for o in c["node_outputs"] if o]
            assert sorted(got) == sorted(outputs), (sorted(got), outputs)
            for name, v in got.items():
                assert v.dtype == output_dtype(c, name), (name, v.dtype)
                assert np.all(np.isfinite(v)), f"{name} is not finite"
            checked = ""
            if c["numpy_check"] is not None:
                want = c["numpy_check"](feeds, c["attributes"])
                assert sorted(want) == sorted(got), (sorted(want), sorted(got))
                diff = max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]), initial=0.0))
                           for k in got)
                assert diff <= 1e-4, f"numpy check: max abs difference {diff:.3g} > 1e-4"
                checked = f"numpy {diff:.3g}"
            onnx.save(model, str(out / f"{c['case']}.onnx"))
            # np.require, not np.ascontiguousarray (which makes a 0-d scalar [1])
            tensors = {f"input.{k}": np.require(v, requirements="C") for k, v in feeds.items()}
            tensors.update({f"output.{k}": np.require(v, requirements="C") for k, v in got.items()})
            save_file(tensors, str(out / f"{c['case']}.io.safetensors"))
            entry = {"case": c["case"], "op": c["op"], "domain": c["domain"],
                     "inputs": [i[0] for i in c["inputs"]], "outputs": outputs,
                     "node_inputs": c["node_inputs"], "node_outputs": c["node_outputs"],
                     "attributes": c["attributes"], "dtype": c["dtype"], "reference": reference}
            if c["output_dtypes"]:
                entry["output_dtypes"] = {k: np.dtype(v).name
                                          for k, v in c["output_dtypes"].items()}
            if checked:
                entry["checked_by"] = checked
            manifest.append(entry)
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in got.items())
            print(f"wrote {c['case']:40s} {c['domain'] or '(default)'}:{c['op']} {c['dtype']} "
                  f"[{reference}] -> {shapes}" + (f"; {checked}" if checked else ""), flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, then fail
            failed.append(c["case"])
            print(f"FAIL  {c['case']}: {type(e).__name__}: {e}", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(manifest)} cases written to {out}, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
