"""onnxruntime's own quantizers against lora-graft's `merge --requantize` (needs
onnxruntime, numpy, safetensors).

    python tests/quantizer.py CASES.safetensors

CASES holds, per module M: `w.M` the float merged weight [K, N] (MatMul layout), and what
lora-graft wrote: `b.M` (the uint8 bytes [N, blocks, blob], stored as float32),
`scales.M` (float32 [N * blocks]) and, when asymmetric, `zp.M` (bytes as float32); its
metadata `bits`, `block_size`, `symmetric` ("1"/"0").
Each `w.M` is quantized by onnxruntime's `quantize_matmul_{2,4,8}bits` (MLAS, what
`MatMulNBitsQuantizer` and onnxruntime-genai's builder call); the packed values, scales
and zero points must be equal.

With metadata `kind` = "int8" instead: `w.M` is the weight as the node reads it, `q.M` the
int8 values lora-graft wrote (as float32), `scale.M` its scales and `axis.M` ([1]: the axis
of `w.M` the scales run along, -1 for one scale); each channel (or the whole tensor) is
quantized by onnxruntime's `quant_utils.quantize_data(…, INT8, symmetric=True)`, what its
weight quantizers call, and must give the same values and scales.
Prints one line per module; exits non-zero on a mismatch.
"""
import sys

import numpy as np
from onnxruntime.capi import _pybind_state as C
from safetensors import safe_open


def int8(f, modules):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    bad = 0
    for m in modules:
        w = f.get_tensor(f"w.{m}").astype(np.float32)
        ours_q = f.get_tensor(f"q.{m}").astype(np.int8)
        ours_s = f.get_tensor(f"scale.{m}").astype(np.float32).reshape(-1)
        axis = int(f.get_tensor(f"axis.{m}")[0])
        lanes = [w] if axis < 0 else [np.take(w, c, axis=axis) for c in range(w.shape[axis])]
        want_q, want_s = [], []
        for lane in lanes:
            _, scale, q = quantize_data(lane, TensorProto.INT8, True)
            want_q.append(q)
            want_s.append(float(scale))
        want_q = want_q[0] if axis < 0 else np.stack(want_q, axis=axis)
        q_diff = int(np.count_nonzero(want_q != ours_q))
        s_diff = float(np.max(np.abs(np.array(want_s, np.float32) - ours_s)))
        ok = q_diff == 0 and s_diff == 0.0
        bad += not ok
        print(f"{m}: int8 symmetric, {'per tensor' if axis < 0 else f'per channel (axis {axis})'}: "
              f"{q_diff} values differ, scales off by {s_diff:.3g}{'' if ok else '  MISMATCH'}")
    return bad


def main(path):
    with safe_open(path, "numpy") as f:
        meta = f.metadata()
        modules = sorted(k[2:] for k in f.keys() if k.startswith("w."))
        if meta.get("kind") == "int8":
            bad = int8(f, modules)
            if bad:
                sys.exit(f"{bad} of {len(modules)} modules differ from onnxruntime's quantizer")
            print("quantizer: ok")
            return
        bits, block, symmetric = int(meta["bits"]), int(meta["block_size"]), meta["symmetric"] == "1"
        quantize = {2: C.quantize_matmul_2bits, 4: C.quantize_matmul_4bits, 8: C.quantize_matmul_8bits}[bits]
        bad = 0
        for m in modules:
            w = np.ascontiguousarray(f.get_tensor(f"w.{m}").astype(np.float32))
            k, n = w.shape
            blocks = (k + block - 1) // block
            pad = blocks * block - k
            if pad:
                w = np.pad(w, ((0, pad), (0, 0)))
            kpack = 8 // bits
            packed = np.zeros((n, blocks, (block + kpack - 1) // kpack), dtype=np.uint8)
            scales = np.zeros((n, blocks), dtype=np.float32)
            zp = np.zeros((n, (blocks + kpack - 1) // kpack), dtype=np.uint8)
            quantize(packed, w, scales, zp, block, n, k + pad, symmetric)
            ours_b = f.get_tensor(f"b.{m}").astype(np.uint8).reshape(packed.shape)
            ours_s = f.get_tensor(f"scales.{m}").reshape(scales.shape)
            q_diff = int(np.count_nonzero(ours_b != packed))
            s_diff = float(np.max(np.abs(ours_s - scales)))
            z_diff = 0 if symmetric else int(np.count_nonzero(f.get_tensor(f"zp.{m}").astype(np.uint8).reshape(zp.shape) != zp))
            ok = q_diff == 0 and s_diff == 0.0 and z_diff == 0
            bad += not ok
            print(f"{m}: {bits} bits, blocks of {block}, {'symmetric' if symmetric else 'zero points'}: "
                  f"{q_diff} packed bytes, {z_diff} zero-point bytes differ, scales off by {s_diff:.3g}"
                  f"{'' if ok else '  MISMATCH'}")
    if bad:
        sys.exit(f"{bad} of {len(modules)} modules differ from onnxruntime's quantizer")
    print("quantizer: ok")


if __name__ == "__main__":
    main(sys.argv[1])
