"""``gemv``'s CPU kernel (numba): each weight row read once for all of the few tokens, rows split over
the threads. At one to a few tokens torch's BLAS call does not read the weights at memory speed on every
machine (docs/results/smollm2_decode/); this pass does, and reads bfloat16 tables as stored (half the
bytes, widened in registers)."""
from __future__ import annotations

import numpy as np

from .._numba import NUMBA, as_f32, sync_threads, weight_table
from ..mlp.numba_impl import check_cpu, optional_view

if NUMBA:
    import numba
    from numba import njit, prange

    from .._numba import FAST, act as _act, load

    @njit(fastmath=FAST, cache=True)
    def _rows(x, w, b, act_code, y, start, end):
        """y[:, start:end] = act(x w[start:end]^T + b): each row read once for all tokens. (A separate,
        serial function: numba vectorizes its loops, which it does not inside a prange body.)"""
        m, d = x.shape
        for j in range(start, end):
            r = w[j]
            for i in range(m):
                xi = x[i]
                z = np.float32(0.0)
                for k in range(d):
                    z += load(r, k) * xi[k]
                y[i, j] = _act(z + b[j], act_code)

    @njit(parallel=True, cache=True)
    def _parallel(x, w, b, act_code, y, chunks):
        n = b.shape[0]
        step = (n + chunks - 1) // chunks
        for c in prange(chunks):
            _rows(x, w, b, act_code, y, c * step, min(n, (c + 1) * step))


def gemv_numba(x, w, b, act_code: int) -> np.ndarray:
    """act(x w^T + b) as float32 (M, N) for x (M, d); ``w`` float32 or bfloat16 (N, d)."""
    check_cpu(x, w, b)
    sync_threads()
    return gemv_rows(as_f32(x), w, b, act_code)


def gemv_rows(x32: np.ndarray, w, b, act_code: int) -> np.ndarray:
    """The kernel on a float32 array ``x32``, for callers that have already checked the tensors and synced
    the threads (the gate-skip MLP, which reads the same x again)."""
    y = np.empty((x32.shape[0], w.shape[0]), dtype=np.float32)
    _parallel(x32, weight_table(w), optional_view(b, w.shape[0]), act_code, y, 4 * numba.get_num_threads())
    return y
