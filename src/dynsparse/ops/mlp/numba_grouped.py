"""Group-sparse MLP kernel (numba): a grouped gate switches blocks of ``group_size`` consecutive neurons,
and the block runs group by group instead of token by token.

Walking each token's own list re-reads its neurons' w1 and w2_t rows from L2/L3 for every token (a
256-2048-256 block's weights are 4 MB). Here a thread takes a block of tokens, transposes their lists
into "tokens per group", and then, for each group, keeps the group's rows in L1 while every token that
switched it on passes by: four tokens share each load of a w1 row, and each token adds the group's
w2_t rows four at a time.
"""
from __future__ import annotations

import numpy as np
import torch

from .._numba import FAST, NUMBA, array, sync_threads

if NUMBA:
    import numba
    from numba import njit, prange

    from .._numba import act as _act

# Below this many multiply-adds the kernel runs on one thread (waking the pool costs more).
PARALLEL_MIN_WORK = 1 << 21
IDENTITY = 4  # activation code of the identity: a GLU's up projection


def grouped_mlp(args, indptr, groups, group_size: int, act_code: int, dtype) -> torch.Tensor:
    """``args``: numba_impl's float32 views (x, wg-or-w1, bg, glu, w1, b1, offset, w2_t, b2)."""
    x, glu, w2_t = args[0], args[3], args[7]
    m, d_out = x.shape[0], w2_t.shape[1]
    y = np.empty((m, d_out), dtype=np.float32)
    kernel_args = args + (array(indptr), array(groups), group_size, act_code, y)
    work = groups.numel() * group_size * (x.shape[1] * (1 + glu) + d_out)
    if work < PARALLEL_MIN_WORK:
        _grouped_mlp_block(*kernel_args, 0, m)
    else:
        sync_threads()
        _grouped_mlp_parallel(*kernel_args, numba.get_num_threads())
    return torch.from_numpy(y).to(dtype)


if NUMBA:

    @njit(inline="always", fastmath=FAST, cache=True)
    def _dots4(w1, b1, j, x0, x1, x2, x3, act_code):
        """h[0..3, q] = act(w1[j] . x_t + b1[j]) for four tokens sharing each load of the row."""
        row = w1[j]
        z0 = z1 = z2 = z3 = b1[j]
        for k in range(row.shape[0]):
            r = row[k]
            z0 += r * x0[k]
            z1 += r * x1[k]
            z2 += r * x2[k]
            z3 += r * x3[k]
        return _act(z0, act_code), _act(z1, act_code), _act(z2, act_code), _act(z3, act_code)

    @njit(inline="always", fastmath=FAST, cache=True)
    def _rows_for_one(w1, b1, base, xi, hi, group_size, act_code):
        """hi[q] = act(w1[base+q] . xi + b1[base+q]) for one token, four rows sharing each load of xi."""
        q = 0
        while q + 4 <= group_size:
            r0, r1, r2, r3 = w1[base + q], w1[base + q + 1], w1[base + q + 2], w1[base + q + 3]
            z0, z1, z2, z3 = b1[base + q], b1[base + q + 1], b1[base + q + 2], b1[base + q + 3]
            for k in range(xi.shape[0]):
                xk = xi[k]
                z0 += r0[k] * xk
                z1 += r1[k] * xk
                z2 += r2[k] * xk
                z3 += r3[k] * xk
            hi[q], hi[q + 1] = _act(z0, act_code), _act(z1, act_code)
            hi[q + 2], hi[q + 3] = _act(z2, act_code), _act(z3, act_code)
            q += 4
        while q < group_size:
            row = w1[base + q]
            z = b1[base + q]
            for k in range(xi.shape[0]):
                z += row[k] * xi[k]
            hi[q] = _act(z, act_code)
            q += 1

    @njit(inline="always", fastmath=FAST, cache=True)
    def _add_rows(yi, w2_t, base, hi, group_size):
        """yi += sum_q hi[q] * w2_t[base + q], four rows per pass over yi."""
        d_out = yi.shape[0]
        q = 0
        while q + 4 <= group_size:
            o0, o1, o2, o3 = w2_t[base + q], w2_t[base + q + 1], w2_t[base + q + 2], w2_t[base + q + 3]
            c0, c1, c2, c3 = hi[q], hi[q + 1], hi[q + 2], hi[q + 3]
            for k in range(d_out):
                yi[k] += c0 * o0[k] + c1 * o1[k] + c2 * o2[k] + c3 * o3[k]
            q += 4
        while q < group_size:
            o0 = w2_t[base + q]
            c0 = hi[q]
            for k in range(d_out):
                yi[k] += c0 * o0[k]
            q += 1

    @njit(inline="always", fastmath=FAST, cache=True)
    def _hidden4(wg, bg, glu, w1, b1, off, j, x0, x1, x2, x3, act_code):
        """Hidden value of neuron j for four tokens: ``_dots4`` (times the up projection for a GLU) - off[j]."""
        if glu:
            a0, a1, a2, a3 = _dots4(wg, bg, j, x0, x1, x2, x3, act_code)
            u0, u1, u2, u3 = _dots4(w1, b1, j, x0, x1, x2, x3, IDENTITY)
            a0, a1, a2, a3 = a0 * u0, a1 * u1, a2 * u2, a3 * u3
        else:
            a0, a1, a2, a3 = _dots4(w1, b1, j, x0, x1, x2, x3, act_code)
        return a0 - off[j], a1 - off[j], a2 - off[j], a3 - off[j]

    @njit(inline="always", fastmath=FAST, cache=True)
    def _hidden_one(wg, bg, glu, w1, b1, off, base, xi, hi, up, group_size, act_code):
        """A group's hidden values for one token (``_rows_for_one``; for a GLU, gate times up) - off."""
        if glu:
            _rows_for_one(wg, bg, base, xi, hi, group_size, act_code)
            _rows_for_one(w1, b1, base, xi, up, group_size, IDENTITY)
            for q in range(group_size):
                hi[q] *= up[q]
        else:
            _rows_for_one(w1, b1, base, xi, hi, group_size, act_code)
        for q in range(group_size):
            hi[q] -= off[base + q]

    @njit(fastmath=FAST, cache=True)
    def _grouped_mlp_block(x, wg, bg, glu, w1, b1, off, w2_t, b2, indptr, groups, group_size, act_code, y, i0, i1):
        """Tokens i0..i1-1: lists transposed to tokens per group, then group by group."""
        n_groups = w1.shape[0] // group_size
        for i in range(i0, i1):
            y[i, :] = b2
        start = np.zeros(n_groups + 1, dtype=np.int64)
        for p in range(indptr[i0], indptr[i1]):
            start[groups[p] + 1] += 1
        for g in range(n_groups):
            start[g + 1] += start[g]
        fill = start[:-1].copy()
        tokens = np.empty(start[n_groups], dtype=np.int64)
        for i in range(i0, i1):
            for p in range(indptr[i], indptr[i + 1]):
                g = groups[p]
                tokens[fill[g]] = i
                fill[g] += 1
        h = np.empty((4, group_size), dtype=np.float32)
        up = np.empty(group_size, dtype=np.float32)
        for g in range(n_groups):
            base = g * group_size
            p, end = start[g], start[g + 1]
            while p + 4 <= end:
                t0, t1, t2, t3 = tokens[p], tokens[p + 1], tokens[p + 2], tokens[p + 3]
                x0, x1, x2, x3 = x[t0], x[t1], x[t2], x[t3]
                for q in range(group_size):
                    h[0, q], h[1, q], h[2, q], h[3, q] = _hidden4(wg, bg, glu, w1, b1, off, base + q, x0, x1, x2, x3,
                                                                  act_code)
                _add_rows(y[t0], w2_t, base, h[0], group_size)
                _add_rows(y[t1], w2_t, base, h[1], group_size)
                _add_rows(y[t2], w2_t, base, h[2], group_size)
                _add_rows(y[t3], w2_t, base, h[3], group_size)
                p += 4
            while p < end:
                t0 = tokens[p]
                _hidden_one(wg, bg, glu, w1, b1, off, base, x[t0], h[0], up, group_size, act_code)
                _add_rows(y[t0], w2_t, base, h[0], group_size)
                p += 1

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _grouped_mlp_parallel(x, wg, bg, glu, w1, b1, off, w2_t, b2, indptr, groups, group_size, act_code, y, tasks):
        m = x.shape[0]
        step = (m + tasks - 1) // tasks
        for b in prange(tasks):
            _grouped_mlp_block(x, wg, bg, glu, w1, b1, off, w2_t, b2, indptr, groups, group_size, act_code, y,
                               min(m, b * step), min(m, (b + 1) * step))
