"""Krylov columns exact PiSSA needs on a Gaussian (flat-spectrum) weight, by block size.

Block Lanczos on AᵀA with full reorthogonalization, Rayleigh–Ritz after every step, and
linalg::svd_top's certificate: every one of the top q residuals ‖Aᵀu − σv‖ at most
1e-11·σ₁ and 1e-9 of its own gap. Prints, per block size, the basis size at which the
certificate first holds (the real code checks less often, so it runs a few steps past
it) and the largest error of the values against numpy's full SVD, relative to σ₁.

    python3 benches/krylov_columns.py [N [M [BLOCK ...]]]     (default 2048 2048 1 2 4 8)

Needs numpy. Run with OMP_NUM_THREADS=1 on a shared machine.
"""
import sys
import time

import numpy as np

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
m = int(sys.argv[2]) if len(sys.argv) > 2 else n
blocks = [int(b) for b in sys.argv[3:]] or [1, 2, 4, 8]
q = 16
rng = np.random.default_rng(1)
A = rng.standard_normal((m, n)).astype(np.float32).astype(np.float64)
s_true = np.linalg.svd(A, compute_uv=False)
print(f"{m} x {n}, q {q}: smallest relative gap in the top {q + 1}:",
      np.min(-np.diff(s_true[:q + 1])) / s_true[0])


def certified_columns(b):
    """(basis size, value error / σ₁) when the certificate first holds, or None."""
    V = np.zeros((n, 0))
    Z = np.zeros((n, 0))
    Y = rng.standard_normal((n, b))
    while V.shape[1] + b <= n // 2:
        for _ in range(2):
            Y -= V @ (V.T @ Y)
        Y, _ = np.linalg.qr(Y)
        AtAY = A.T @ (A @ Y)
        V = np.hstack([V, Y])
        Z = np.hstack([Z, AtAY])
        Y = AtAY.copy()
        d = V.shape[1]
        if d <= q:
            continue
        T = V.T @ Z
        lam, W = np.linalg.eigh((T + T.T) / 2)
        lam, W = lam[::-1], W[:, ::-1]
        s = np.sqrt(np.maximum(lam[:q + 1], 0))
        v, zw = V @ W[:, :q], Z @ W[:, :q]
        ok = True
        for k in range(q):
            r = np.linalg.norm(zw[:, k] - s[k] ** 2 * v[:, k]) / s[k]
            gap = s[k] - s[k + 1] if k == 0 else min(s[k] - s[k + 1], s[k - 1] - s[k])
            if r > min(1e-11 * s[0], 1e-9 * gap):
                ok = False
                break
        if ok:
            return d, np.max(np.abs(s[:q] - s_true[:q])) / s_true[0]
    return None


for b in blocks:
    start = time.time()
    print(f"block {b}: {certified_columns(b)} ({time.time() - start:.1f} s)", flush=True)
