"""``gate_skip_mlp``'s CPU kernels (numba): the gate read whole, each kept neuron's rows read once.

First the gate, densely: a = act(g) for every neuron (``gemv``'s row-parallel pass, float32 or
bfloat16). Then per token a neuron with |a| <= threshold is skipped and a kept one reads its w1 row
(GLU: h = a * (w1 . x + b1)) and its w2_t row (the axpy), four neurons at a time. bf16 weights are read
as stored and widened in registers (half the bytes). Few tokens split the kept neurons over the
threads (float32 partial outputs summed after); many tokens take a thread each.
"""
from __future__ import annotations

import numpy as np
import torch

from .._numba import NUMBA, as_f32, sync_threads, weight_table
from ..dense.numba_impl import gemv_rows
from .numba_impl import check_cpu, optional_view

if NUMBA:
    import numba
    from numba import njit, prange

    from .._numba import FAST, act as _act, load

    @njit(inline="always", fastmath=FAST, cache=True)
    def _kept(ai, thr, kept):
        n = 0
        for j in range(ai.shape[0]):
            if abs(ai[j]) > thr:
                kept[n] = j
                n += 1
        return n

    @njit(fastmath=FAST, cache=True)
    def _up_down(xi, ai, glu, w1, b1, off, w2_t, kept, start, end, yi):
        """yi += sum over kept[start:end] of h_j w2_t[j], h_j = a_j * (w1[j] . xi + b1[j]) (GLU) or a_j,
        minus off[j]; four neurons at a time so each load of x and of y serves four rows. Rows are read
        through row views (flat indexing stops the axpy from vectorizing)."""
        d, d_out = xi.shape[0], yi.shape[0]
        p = start
        while p + 4 <= end:
            j0, j1, j2, j3 = kept[p], kept[p + 1], kept[p + 2], kept[p + 3]
            h0, h1, h2, h3 = ai[j0], ai[j1], ai[j2], ai[j3]
            if glu:
                r0, r1, r2, r3 = w1[j0], w1[j1], w1[j2], w1[j3]
                z0, z1, z2, z3 = b1[j0], b1[j1], b1[j2], b1[j3]
                for k in range(d):
                    xk = xi[k]
                    z0 += load(r0, k) * xk
                    z1 += load(r1, k) * xk
                    z2 += load(r2, k) * xk
                    z3 += load(r3, k) * xk
                h0, h1, h2, h3 = h0 * z0, h1 * z1, h2 * z2, h3 * z3
            h0, h1, h2, h3 = h0 - off[j0], h1 - off[j1], h2 - off[j2], h3 - off[j3]
            o0, o1, o2, o3 = w2_t[j0], w2_t[j1], w2_t[j2], w2_t[j3]
            for q in range(d_out):
                yi[q] += h0 * load(o0, q) + h1 * load(o1, q) + h2 * load(o2, q) + h3 * load(o3, q)
            p += 4
        while p < end:
            j = kept[p]
            h = ai[j]
            if glu:
                z = b1[j]
                r = w1[j]
                for k in range(d):
                    z += load(r, k) * xi[k]
                h = h * z
            h -= off[j]
            o = w2_t[j]
            for q in range(d_out):
                yi[q] += h * load(o, q)
            p += 1

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _per_token(x, a, glu, w1, b1, off, w2_t, b2, thr, y):
        for i in prange(x.shape[0]):
            kept = np.empty(a.shape[1], dtype=np.int64)
            n = _kept(a[i], thr, kept)
            yi = y[i]
            yi[:] = b2
            _up_down(x[i], a[i], glu, w1, b1, off, w2_t, kept, 0, n, yi)

    @njit(fastmath=FAST, cache=True)
    def _serial(x, a, glu, w1, b1, off, w2_t, b2, thr, y):
        kept = np.empty(a.shape[1], dtype=np.int64)
        for i in range(x.shape[0]):
            n = _kept(a[i], thr, kept)
            yi = y[i]
            yi[:] = b2
            _up_down(x[i], a[i], glu, w1, b1, off, w2_t, kept, 0, n, yi)

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _split(x, a, glu, w1, b1, off, w2_t, b2, thr, y, parts):
        """Few tokens: each thread takes a slice of a token's kept neurons; the partial outputs add up."""
        n_parts, d_out = parts.shape
        kept = np.empty(a.shape[1], dtype=np.int64)
        for i in range(x.shape[0]):
            n = _kept(a[i], thr, kept)
            step = (n + n_parts - 1) // n_parts
            for t in prange(n_parts):
                part = parts[t]
                part[:] = 0.0
                s = min(n, t * step)
                _up_down(x[i], a[i], glu, w1, b1, off, w2_t, kept, s, min(n, s + step), part)
            yi = y[i]
            yi[:] = b2
            for t in range(n_parts):
                for q in range(d_out):
                    yi[q] += parts[t, q]


# Below this many multiply-adds the kept neurons run on one thread. Lower than the per-token sparse
# MLP's bound: a decode step's kept rows (about a million multiply-adds) ran twice as fast split in two.
SPLIT_MIN_WORK = 1 << 18


def gate_skip_mlp_numba(x, w1, b1, w2_t, b2, wg, bg, offset, threshold, act_code: int) -> torch.Tensor:
    check_cpu(x, w1, w2_t, wg)
    sync_threads()
    d_ff, d_out = w2_t.shape
    glu = wg is not None
    x32 = as_f32(x)
    # the gate by gemv's kernel (torch's BLAS call was half as fast at one token, and reads bf16 no cheaper)
    a = gemv_rows(x32, wg, bg, act_code) if glu else gemv_rows(x32, w1, b1, act_code)
    thr = np.float32(float(threshold))
    args = (x32, a, glu, weight_table(w1), optional_view(b1, d_ff), optional_view(offset, d_ff),
            weight_table(w2_t), optional_view(b2, d_out), thr)
    y = np.empty((x.shape[0], d_out), dtype=np.float32)
    threads = numba.get_num_threads()
    kept = int((np.abs(a) > thr).sum())
    if kept * (x.shape[1] * glu + d_out) < SPLIT_MIN_WORK or threads == 1:
        _serial(*args, y)
    elif x.shape[0] < threads:
        _split(*args, y, np.empty((threads, d_out), dtype=np.float32))
    else:
        _per_token(*args, y)
    return torch.from_numpy(y).to(x.dtype)
