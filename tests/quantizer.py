"""onnxruntime's own MatMulNBits quantizer against lora-graft's `merge --requantize`
(needs onnxruntime, numpy, safetensors).

    python tests/quantizer.py CASES.safetensors

CASES holds, per module M: `w.M` the float merged weight [K, N] (MatMul layout), and what
lora-graft wrote: `b.M` (the uint8 bytes [N, blocks, blob], stored as float32),
`scales.M` (float32 [N * blocks]) and, when asymmetric, `zp.M` (bytes as float32); its
metadata `bits`, `block_size`, `symmetric` ("1"/"0").
Each `w.M` is quantized by onnxruntime's `quantize_matmul_{2,4,8}bits` (MLAS, what
`MatMulNBitsQuantizer` and onnxruntime-genai's builder call); the packed values, scales
and zero points must be equal.  Prints one line per module; exits non-zero on a mismatch.
"""
import sys

import numpy as np
from onnxruntime.capi import _pybind_state as C
from safetensors import safe_open


def main(path):
    with safe_open(path, "numpy") as f:
        meta = f.metadata()
        bits, block, symmetric = int(meta["bits"]), int(meta["block_size"]), meta["symmetric"] == "1"
        quantize = {2: C.quantize_matmul_2bits, 4: C.quantize_matmul_4bits, 8: C.quantize_matmul_8bits}[bits]
        modules = sorted(k[2:] for k in f.keys() if k.startswith("w."))
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
