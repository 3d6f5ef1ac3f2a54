"""Gates that write each token's list straight into CSR (numba), without a dense mask and nonzero().

The low-rank gate's cheap half (x @ A, (M, r)) runs in BLAS; the scan then computes each logit tile,
compares it with the thresholds and appends the winners, so the (M, d_ff) logits never reach memory.
"""
from __future__ import annotations

import numpy as np
import torch

from .._numba import FAST, NUMBA, as_f32, sync_threads
from ..mlp.numba_impl import check_cpu, optional_view

if NUMBA:
    from numba import njit, prange


def lowrank_gate_indices_numba(x, A, B, c, threshold):
    check_cpu(x, A, B, c, threshold)
    d_ff = B.shape[1]
    u = x.float() @ A.float()  # (M, r): the cheap half, dense BLAS
    sync_threads()
    m = u.shape[0]
    counts = np.empty(m, dtype=np.int64)
    scratch = np.empty((m, d_ff), dtype=np.int32)
    _lowrank_scan(as_f32(u), as_f32(B), optional_view(c, d_ff), as_f32(threshold), scratch, counts)
    return _compact(scratch, counts)


def _grouped(x, G, c, threshold, group_size: int):
    check_cpu(x, G, c, threshold)
    logits = x.float() @ G.float()  # (M, d_ff / group_size): small, dense BLAS
    if c is not None:
        logits += c.float()
    m, n_groups = logits.shape
    counts = np.empty(m, dtype=np.int64)
    scratch = np.empty((m, n_groups * group_size), dtype=np.int32)
    _grouped_scan(as_f32(logits), as_f32(threshold), group_size, scratch, counts)
    return _compact(scratch, counts)


def grouped_gate_indices_numba(x, G, c, threshold, group_size: int):
    return _grouped(x, G, c, threshold, group_size)


def grouped_gate_groups_numba(x, G, c, threshold):
    return _grouped(x, G, c, threshold, 1)  # a group of one neuron is its own group index


def _compact(scratch: np.ndarray, counts: np.ndarray):
    indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    _gather_rows(scratch, counts, indptr, indices)
    return torch.from_numpy(indptr), torch.from_numpy(indices)


if NUMBA:

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _lowrank_scan(u, B, c, thr, scratch, counts):
        # Tiles of 8 tokens x 512 neurons keep the logits in L1 while the r rows of B stream past.
        m, r = u.shape
        d_ff = B.shape[1]
        tb, tj = 8, 512
        for b in prange((m + tb - 1) // tb):
            i0 = b * tb
            nt = min(m, i0 + tb) - i0
            acc = np.empty((tb, tj), dtype=np.float32)
            ns = np.zeros(tb, dtype=np.int64)
            for j0 in range(0, d_ff, tj):
                nj = min(tj, d_ff - j0)
                for t in range(nt):
                    for j in range(nj):
                        acc[t, j] = c[j0 + j]
                for k in range(r):
                    row = B[k, j0:j0 + nj]
                    for t in range(nt):
                        uk = u[i0 + t, k]
                        a = acc[t]
                        for j in range(nj):
                            a[j] += uk * row[j]
                for t in range(nt):
                    out = scratch[i0 + t]
                    n = ns[t]
                    for j in range(nj):
                        if acc[t, j] > thr[j0 + j]:
                            out[n] = j0 + j
                            n += 1
                    ns[t] = n
            for t in range(nt):
                counts[i0 + t] = ns[t]

    # The two list-writing kernels below are plain memory passes (~nnz stores): serial, which also
    # keeps numba's compile time (paid once per machine) down.
    @njit(cache=True)
    def _grouped_scan(logits, thr, group_size, scratch, counts):
        m, n_groups = logits.shape
        for i in range(m):
            n = 0
            out = scratch[i]
            for g in range(n_groups):
                if logits[i, g] > thr[g]:
                    base = g * group_size
                    for q in range(group_size):
                        out[n] = base + q
                        n += 1
            counts[i] = n

    @njit(cache=True)
    def _gather_rows(scratch, counts, indptr, indices):
        for i in range(counts.shape[0]):
            start = indptr[i]
            row = scratch[i]
            for q in range(counts[i]):
                indices[start + q] = row[q]
