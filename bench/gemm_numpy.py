#!/usr/bin/env python3
"""OpenBLAS sgemm (through NumPy) on the encoder's shapes, y = x @ W.T with W [N, K]:
the anchor for `cargo bench --bench gemm`. Run both in one go to compare on a noisy VM."""
import time
import numpy as np

print("numpy", np.__version__, "BLAS:", np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"])
print(f"{'M':>6} {'K':>6} {'N':>6} {'ms':>10} {'GFLOP/s':>10}")
for k, n in [(384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768)]:
    for m in (128, 1024, 4096):
        x = np.random.rand(m, k).astype(np.float32)
        w = np.random.rand(n, k).astype(np.float32)
        y = np.empty((m, n), np.float32)
        np.matmul(x, w.T, out=y)
        times = []
        start = time.perf_counter()
        while len(times) < 10 or time.perf_counter() - start < 0.5:
            t = time.perf_counter(); np.matmul(x, w.T, out=y); times.append(time.perf_counter() - t)
        med = sorted(times)[len(times) // 2]
        print(f"{m:>6} {k:>6} {n:>6} {med * 1e3:>10.3f} {2 * m * k * n / med / 1e9:>10.1f}")
