"""The ceiling of row-gather kernels on this machine: numba's dot and axpy rate on rows streamed from L2.

A tree or gated-MLP kernel does per (token, neuron) one dot product with a weight row and one axpy with
another row. Rows come from L2 at best (a 768-wide fp32 row is 3 KB; L1 holds a handful), and a dot
needs a new weight number per multiply-add unless several tokens share the row. This loop is that best
case: four tokens (in L1) share every row, rows stream from L2. It, not the matmul peak, is the
speed-of-light of the sparse paths, and ``dynsparse bench`` reports it next to the matmul and memory peaks.
"""
from __future__ import annotations

import time

import numpy as np

from ..ops._numba import FAST, NUMBA, sync_threads

if NUMBA:
    import numba
    from numba import njit, prange

    @njit(inline="always", fastmath=FAST, cache=True)
    def _dots(row, xt, z, j):
        z0 = z1 = z2 = z3 = np.float32(0.0)
        for k in range(row.shape[0]):
            w = row[k]
            z0 += w * xt[0, k]
            z1 += w * xt[1, k]
            z2 += w * xt[2, k]
            z3 += w * xt[3, k]
        z[0, j], z[1, j], z[2, j], z[3, j] = z0, z1, z2, z3

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _dot_axpy_loop(x, rows, out, reps):
        """Per thread, four rows at a time (from L2): four tokens (in L1) share each row for their dot
        products, then each token adds the four rows into its output in one pass - the tree kernel's
        inner loops when four tokens sit at the same nodes."""
        for t in prange(x.shape[0]):
            xt, rt, ot = x[t], rows[t], out[t]
            z = np.zeros((4, 4), dtype=np.float32)
            for _ in range(reps):
                for r in range(0, rt.shape[0] - 3, 4):
                    r0, r1, r2, r3 = rt[r], rt[r + 1], rt[r + 2], rt[r + 3]
                    _dots(r0, xt, z, 0)
                    _dots(r1, xt, z, 1)
                    _dots(r2, xt, z, 2)
                    _dots(r3, xt, z, 3)
                    for q in range(4):
                        acc = ot[q]
                        c0, c1, c2, c3 = z[q, 0], z[q, 1], z[q, 2], z[q, 3]
                        for k in range(acc.shape[0]):
                            acc[k] += c0 * r0[k] + c1 * r1[k] + c2 * r2[k] + c3 * r3[k]


def gather_ceiling_gflops(threads: int, d: int = 768, rows: int = 48, seconds: float = 0.2) -> float:
    """GFLOP/s of the dot + axpy loop: ``rows`` rows of width d per thread (48 x 3 KB: beyond L1,
    inside L2), four tokens sharing each row, one data set per thread."""
    if not NUMBA:
        return float("nan")
    sync_threads()
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((threads, 4, d)).astype(np.float32) * 1e-3
    table = rng.standard_normal((threads, rows, d)).astype(np.float32) * 1e-3
    out = np.zeros((threads, 4, d), dtype=np.float32)
    _dot_axpy_loop(x, table, out, 1)
    reps = 4
    while True:
        t0 = time.perf_counter()
        _dot_axpy_loop(x, table, out, reps)
        elapsed = time.perf_counter() - t0
        if elapsed > seconds:
            break
        reps *= 4
    flops_per_rep = threads * rows * 4 * 2 * d * 2  # per row: four dots and four axpys of width d, 2 FLOPs each
    return flops_per_rep * reps / elapsed / 1e9
