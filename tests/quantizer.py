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
int8 or uint8 values lora-graft wrote (as float32), `scale.M` its scales, `zp.M` its zero
points (when the weight has them), `signed.M` ([1]: 1 for int8) and `axis.M` ([1]: the axis
of `w.M` the scales run along, -1 for one scale); each channel (or the whole tensor) is
quantized by onnxruntime's `quant_utils.quantize_data(…, INT8 or UINT8, symmetric)`, what
its weight quantizers call (symmetric when there are no zero points or all are the type's
middle), and must give the same values, scales and zero points.
With `kind` = "qdq4" (metadata `block_size`, `symmetric`): `w.M` the float weight [K, N],
`q.M` the 4-bit values, `scale.M` and `zp.M` [K / block, N], against
`quantize_qdq_matmul_4bits`, what `MatMulNBitsQuantizer`'s QDQ format calls.
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
    keys = set(f.keys())
    for m in modules:
        w = f.get_tensor(f"w.{m}").astype(np.float32)
        signed = f.get_tensor(f"signed.{m}")[0] == 1
        qtype, middle = (TensorProto.INT8, 0) if signed else (TensorProto.UINT8, 128)
        ours_q = f.get_tensor(f"q.{m}").astype(np.int64)
        ours_s = f.get_tensor(f"scale.{m}").astype(np.float32).reshape(-1)
        ours_z = f.get_tensor(f"zp.{m}").astype(np.int64).reshape(-1) if f"zp.{m}" in keys else None
        # onnxruntime's symmetric quantizer writes the type's middle as every zero point
        symmetric = ours_z is None or bool(np.all(ours_z == middle))
        axis = int(f.get_tensor(f"axis.{m}")[0])
        lanes = [w] if axis < 0 else [np.take(w, c, axis=axis) for c in range(w.shape[axis])]
        want_q, want_s, want_z = [], [], []
        for lane in lanes:
            zero, scale, q = quantize_data(lane, qtype, symmetric)
            want_q.append(q.astype(np.int64))
            want_s.append(float(scale))
            want_z.append(int(zero))
        want_q = want_q[0] if axis < 0 else np.stack(want_q, axis=axis)
        q_diff = int(np.count_nonzero(want_q != ours_q))
        s_diff = float(np.max(np.abs(np.array(want_s, np.float32) - ours_s)))
        z_diff = 0 if ours_z is None else int(np.count_nonzero(np.array(want_z) != ours_z))
        ok = q_diff == 0 and s_diff == 0.0 and z_diff == 0
        bad += not ok
        kind = f"{'int8' if signed else 'uint8'} {'symmetric' if symmetric else 'with zero points'}"
        print(f"{m}: {kind}, {'per tensor' if axis < 0 else f'per channel (axis {axis})'}: "
              f"{q_diff} values, {z_diff} zero points differ, scales off by {s_diff:.3g}"
              f"{'' if ok else '  MISMATCH'}")
    return bad


def qdq4(f, modules, block, symmetric):
    """MatMulNBitsQuantizer's QDQ format: onnxruntime's quantize_qdq_matmul_4bits (MLAS) on
    the float weight [K, N]: values [K, N] (int4 when symmetric, else uint4), scales and
    zero points [K / block, N], each packed two a byte, the first in the low nibble."""
    def nibbles(packed, count, signed):
        v = np.zeros(2 * len(packed), np.int64)
        v[0::2], v[1::2] = packed & 15, packed >> 4
        v = v[:count]
        return np.where(v >= 8, v - 16, v) if signed else v

    bad = 0
    for m in modules:
        w = np.ascontiguousarray(f.get_tensor(f"w.{m}").astype(np.float32))
        k, n = w.shape
        blocks = (k + block - 1) // block
        packed = np.zeros((k * n + 1) // 2, np.uint8)
        zp = np.zeros((n * blocks + 1) // 2, np.uint8)
        scales = np.zeros((blocks, n), np.float32)
        C.quantize_qdq_matmul_4bits(packed, w, scales, zp, block, n, k, symmetric)
        want_q = nibbles(packed, k * n, symmetric).reshape(k, n)
        ours_q = f.get_tensor(f"q.{m}").astype(np.int64).reshape(k, n)
        ours_s = f.get_tensor(f"scale.{m}").reshape(blocks, n)
        q_diff = int(np.count_nonzero(want_q != ours_q))
        s_diff = float(np.max(np.abs(ours_s - scales)))
        z_diff = 0
        if not symmetric:
            want_z = nibbles(zp, blocks * n, False).reshape(blocks, n)
            z_diff = int(np.count_nonzero(f.get_tensor(f"zp.{m}").astype(np.int64).reshape(blocks, n) != want_z))
        ok = q_diff == 0 and s_diff == 0.0 and z_diff == 0
        bad += not ok
        print(f"{m}: QDQ 4 bits, blocks of {block}, {'symmetric' if symmetric else 'zero points'}: "
              f"{q_diff} values, {z_diff} zero points differ, scales off by {s_diff:.3g}"
              f"{'' if ok else '  MISMATCH'}")
    return bad


def main(path):
    with safe_open(path, "numpy") as f:
        meta = f.metadata()
        modules = sorted(k[2:] for k in f.keys() if k.startswith("w."))
        if meta.get("kind") in ("int8", "qdq4"):
            if meta["kind"] == "int8":
                bad = int8(f, modules)
            else:
                bad = qdq4(f, modules, int(meta["block_size"]), meta["symmetric"] == "1")
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
