"""The sparse MLP ops' CPU kernels (numba), and how each strategy runs on them.

* ``token``: per token, for each listed neuron a dot with its w1 row (two dots for a GLU), then an axpy
  with its w2_t row, four neurons at a time (two for a GLU) so each load of x and of y serves several rows.
  Small work runs on one thread (waking the pool costs more than it saves), few tokens split each
  token's list over the threads, many tokens take a thread each.
* ``union``: one pass over the lists marks the batch's union and each token's mask over it; the rest is
  dense BLAS over the union's rows (``torch_impl.over_union``).
* ``grouped``: group lists run group by group (``numba_grouped``).
* relu skip: dense fc1 + ReLU in BLAS, then fc2 over each token's non-zeros.

Everything computes in float32 and returns x's dtype; float32 contiguous weights are read in place.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .._numba import FAST, NUMBA, array, as_f32, sync_threads, weight_view
from . import numba_grouped
from .torch_impl import over_union

if NUMBA:
    import numba
    from numba import njit, prange

    from .._numba import act as _act

# Below this many multiply-adds (~0.1-0.2 ms on one core) the per-token kernel runs on one thread:
# waking the pool costs more than it saves, and far more when other processes hold the cores.
PARALLEL_MIN_WORK = 1 << 21


def optional_view(t, n: int) -> np.ndarray:
    """weight_view of an optional vector; zeros (n,) where it is None (the kernels take no None)."""
    return weight_view(t) if t is not None else np.zeros(n, dtype=np.float32)


def check_cpu(*tensors) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"backend 'numba' runs on CPU tensors, got one on {t.device}")


def _args(x, w1, b1, w2_t, b2, wg, bg, offset):
    """The kernels' view of the weights: (x, wg-or-w1, bg, glu, w1, b1, offset, w2_t, b2) as float32 arrays."""
    d_ff, d_out = w2_t.shape
    glu = wg is not None
    w1_view = weight_view(w1)
    return (as_f32(x), weight_view(wg) if glu else w1_view, optional_view(bg, d_ff), glu, w1_view,
            optional_view(b1, d_ff), optional_view(offset, d_ff), weight_view(w2_t), optional_view(b2, d_out))


def sparse_mlp_numba(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy: str, group_size: int,
                     act_code: int) -> torch.Tensor:
    check_cpu(x, w1, w2_t, wg, indptr, indices)
    indptr, indices = indptr.contiguous(), indices.contiguous()
    if strategy == "union":
        union, mask = union_and_mask(indptr, indices, w1.shape[0])
        return over_union(x, w1, b1, w2_t, b2, wg, bg, offset, union, mask, act_code)
    if strategy == "grouped":
        return numba_grouped.grouped_mlp(_args(x, w1, b1, w2_t, b2, wg, bg, offset), indptr, indices, group_size,
                                         act_code, x.dtype)
    return _per_token(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, act_code)


def _per_token(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, act_code) -> torch.Tensor:
    sync_threads()
    d_out = w2_t.shape[1]
    y = np.empty((x.shape[0], d_out), dtype=np.float32)
    args = _args(x, w1, b1, w2_t, b2, wg, bg, offset) + (array(indptr), array(indices))
    threads = numba.get_num_threads()
    if indices.numel() * (x.shape[1] * (1 + (wg is not None)) + d_out) < PARALLEL_MIN_WORK or threads == 1:
        _sparse_mlp_serial(*args, act_code, y)
    elif x.shape[0] < threads:
        _sparse_mlp_split(*args, act_code, y, np.empty((threads, d_out), dtype=np.float32))
    else:
        _sparse_mlp(*args, act_code, y)
    return torch.from_numpy(y).to(x.dtype)


def union_and_mask(indptr, indices, d_ff: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's union of listed neurons (ascending) and each token's 0/1 mask over it, (M, |union|),
    in one pass over the lists."""
    m = indptr.numel() - 1
    ptr, idx = array(indptr), array(indices)
    present = np.zeros(d_ff, dtype=np.int64)
    union_size = _mark_union(idx, present)
    union = np.empty(union_size, dtype=np.int64)
    mask = np.zeros((m, union_size), dtype=np.float32)
    _fill_union_mask(ptr, idx, present, union, mask)
    return torch.from_numpy(union), torch.from_numpy(mask)


def relu_skip_mlp_numba(x, w1, b1, w2_t, b2) -> torch.Tensor:
    check_cpu(x, w1, w2_t)
    h = F.relu(F.linear(x.float(), w1.float(), None if b1 is None else b1.float()))
    sync_threads()
    d_out = w2_t.shape[1]
    y = np.empty((x.shape[0], d_out), dtype=np.float32)
    _skip_fc2(as_f32(h), weight_view(w2_t), optional_view(b2, d_out), y)
    return torch.from_numpy(y).to(x.dtype)


if NUMBA:

    @njit(cache=True)
    def _mark_union(indices, present):
        """present[j] = 1 for every listed neuron; returns how many there are."""
        for p in range(indices.shape[0]):
            present[indices[p]] = 1
        n = 0
        for j in range(present.shape[0]):
            n += present[j]
        return n

    @njit(cache=True)
    def _fill_union_mask(indptr, indices, present, union, mask):
        """union <- the marked neurons in order; present[j] <- j's column in it; mask[i, col] = 1."""
        n = 0
        for j in range(present.shape[0]):
            if present[j]:
                union[n] = j
                present[j] = n
                n += 1
        for i in range(indptr.shape[0] - 1):
            for p in range(indptr[i], indptr[i + 1]):
                mask[i, present[indices[p]]] = 1.0

    @njit(inline="always", fastmath=FAST, cache=True)
    def _accumulate(xi, w1, b1, off, w2_t, indices, start, end, act_code, yi):
        """yi += sum over indices[start:end] of act(w1[j] . xi + b1[j]) * w2_t[j], four neurons at a
        time so each load of x (dot) and of y (axpy) serves four rows."""
        d = xi.shape[0]
        d_out = yi.shape[0]
        p = start
        while p + 4 <= end:
            j0, j1, j2, j3 = indices[p], indices[p + 1], indices[p + 2], indices[p + 3]
            r0, r1, r2, r3 = w1[j0], w1[j1], w1[j2], w1[j3]
            z0, z1, z2, z3 = b1[j0], b1[j1], b1[j2], b1[j3]
            for k in range(d):
                xk = xi[k]
                z0 += r0[k] * xk
                z1 += r1[k] * xk
                z2 += r2[k] * xk
                z3 += r3[k] * xk
            h0, h1 = _act(z0, act_code) - off[j0], _act(z1, act_code) - off[j1]
            h2, h3 = _act(z2, act_code) - off[j2], _act(z3, act_code) - off[j3]
            o0, o1, o2, o3 = w2_t[j0], w2_t[j1], w2_t[j2], w2_t[j3]
            for q in range(d_out):
                yi[q] += h0 * o0[q] + h1 * o1[q] + h2 * o2[q] + h3 * o3[q]
            p += 4
        while p < end:
            j = indices[p]
            row = w1[j]
            z = b1[j]
            for k in range(d):
                z += row[k] * xi[k]
            h = _act(z, act_code) - off[j]
            out = w2_t[j]
            for q in range(d_out):
                yi[q] += h * out[q]
            p += 1

    @njit(inline="always", fastmath=FAST, cache=True)
    def _accumulate_glu(xi, wg, bg, w1, b1, off, w2_t, indices, start, end, act_code, yi):
        """GLU form of ``_accumulate``: yi += act(wg[j] . xi + bg[j]) * (w1[j] . xi + b1[j]) * w2_t[j],
        two neurons at a time (four dots share each load of x)."""
        d = xi.shape[0]
        d_out = yi.shape[0]
        p = start
        while p + 2 <= end:
            j0, j1 = indices[p], indices[p + 1]
            g0, g1, u0, u1 = wg[j0], wg[j1], w1[j0], w1[j1]
            zg0, zg1, zu0, zu1 = bg[j0], bg[j1], b1[j0], b1[j1]
            for k in range(d):
                xk = xi[k]
                zg0 += g0[k] * xk
                zg1 += g1[k] * xk
                zu0 += u0[k] * xk
                zu1 += u1[k] * xk
            h0, h1 = _act(zg0, act_code) * zu0 - off[j0], _act(zg1, act_code) * zu1 - off[j1]
            o0, o1 = w2_t[j0], w2_t[j1]
            for q in range(d_out):
                yi[q] += h0 * o0[q] + h1 * o1[q]
            p += 2
        if p < end:
            j = indices[p]
            g, u = wg[j], w1[j]
            zg, zu = bg[j], b1[j]
            for k in range(d):
                zg += g[k] * xi[k]
                zu += u[k] * xi[k]
            h = _act(zg, act_code) * zu - off[j]
            out = w2_t[j]
            for q in range(d_out):
                yi[q] += h * out[q]

    @njit(inline="always", fastmath=FAST, cache=True)
    def _accumulate_any(xi, wg, bg, glu, w1, b1, off, w2_t, indices, start, end, act_code, yi):
        if glu:
            _accumulate_glu(xi, wg, bg, w1, b1, off, w2_t, indices, start, end, act_code, yi)
        else:
            _accumulate(xi, w1, b1, off, w2_t, indices, start, end, act_code, yi)

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _sparse_mlp(x, wg, bg, glu, w1, b1, off, w2_t, b2, indptr, indices, act_code, y):
        for i in prange(x.shape[0]):
            yi = y[i]
            yi[:] = b2
            _accumulate_any(x[i], wg, bg, glu, w1, b1, off, w2_t, indices, indptr[i], indptr[i + 1], act_code, yi)

    @njit(fastmath=FAST, cache=True)
    def _sparse_mlp_serial(x, wg, bg, glu, w1, b1, off, w2_t, b2, indptr, indices, act_code, y):
        for i in range(x.shape[0]):
            yi = y[i]
            yi[:] = b2
            _accumulate_any(x[i], wg, bg, glu, w1, b1, off, w2_t, indices, indptr[i], indptr[i + 1], act_code, yi)

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _sparse_mlp_split(x, wg, bg, glu, w1, b1, off, w2_t, b2, indptr, indices, act_code, y, parts):
        """Few tokens, more threads: each thread takes a slice of a token's list, partial sums add up."""
        n_parts, d_out = parts.shape
        for i in range(x.shape[0]):
            start, end = indptr[i], indptr[i + 1]
            step = (end - start + n_parts - 1) // n_parts
            for t in prange(n_parts):
                part = parts[t]
                part[:] = 0.0
                a = min(end, start + t * step)
                _accumulate_any(x[i], wg, bg, glu, w1, b1, off, w2_t, indices, a, min(end, a + step), act_code, part)
            yi = y[i]
            yi[:] = b2
            for t in range(n_parts):
                for q in range(d_out):
                    yi[q] += parts[t, q]

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _skip_fc2(h, w2_t, b2, y):
        m, d_ff = h.shape
        d_out = w2_t.shape[1]
        for i in prange(m):
            hi = h[i]
            yi = y[i]
            yi[:] = b2
            nz = np.empty(d_ff, dtype=np.int64)
            n = 0
            for j in range(d_ff):
                if hi[j] != 0.0:
                    nz[n] = j
                    n += 1
            p = 0
            while p + 4 <= n:  # four rows per pass over y, as in _accumulate
                j0, j1, j2, j3 = nz[p], nz[p + 1], nz[p + 2], nz[p + 3]
                v0, v1, v2, v3 = hi[j0], hi[j1], hi[j2], hi[j3]
                o0, o1, o2, o3 = w2_t[j0], w2_t[j1], w2_t[j2], w2_t[j3]
                for q in range(d_out):
                    yi[q] += v0 * o0[q] + v1 * o1[q] + v2 * o2[q] + v3 * o3[q]
                p += 4
            while p < n:
                j = nz[p]
                v = hi[j]
                out = w2_t[j]
                for q in range(d_out):
                    yi[q] += v * out[q]
                p += 1
