"""Tree FF inference on CPU with numba: one fused root-to-leaf walk per token and tree.

Each token reads only depth+1 rows of w_in and w_out per tree (a dot product, then an axpy), so the
work is trees * (depth+1) * (d + d_out) multiply-adds instead of a dense MLP's d * width * 2.
Compiled on first use and cached on disk. Inference only: no autograd.
"""
from __future__ import annotations

import math

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange

    _NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    _NUMBA = False


def numba_available() -> bool:
    return _NUMBA


if _NUMBA:

    @njit(inline="always", fastmath=False, cache=True)
    def _act(z, code):
        if code == 0:
            return 0.5 * z * (1.0 + math.erf(z * 0.7071067811865476))
        if code == 1:
            return z if z > 0.0 else 0.0
        if code == 2:
            return z / (1.0 + math.exp(-z))
        if code == 3:
            return math.tanh(z)
        return z

    @njit(parallel=True, fastmath=False, cache=True)
    def _tree_forward(x, w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves):
        m, d = x.shape
        trees, nodes, d_out = w_out.shape
        first_leaf = (1 << depth) - 1
        for i in prange(m):
            xi = x[i]
            yi = y[i]
            h = np.empty(d_out, dtype=np.float32)
            for j in range(d_out):
                yi[j] = 0.0
            for t in range(trees):
                if act_on_path:
                    for j in range(d_out):
                        h[j] = 0.0
                node = 0
                for _ in range(depth + 1):
                    row = w_in[t, node]
                    z = b_in[t, node]
                    for k in range(d):
                        z += row[k] * xi[k]
                    c = z if act_on_path else _act(z, act_code)
                    out = w_out[t, node]
                    if act_on_path:
                        for j in range(d_out):
                            h[j] += c * out[j]
                    else:
                        for j in range(d_out):
                            yi[j] += c * out[j]
                    last = node
                    node = 2 * node + 2 if z > 0.0 else 2 * node + 1
                leaves[i, t] = last - first_leaf
                if act_on_path:
                    for j in range(d_out):
                        yi[j] += _act(h[j], act_code)


def tree_forward_kernel(x, w_in, b_in, w_out, depth, act_code, act_on_path):
    """x: (M, d) -> (y (M, d_out), leaves (M, T)), computed in fp32 and returned in x's dtype."""
    if not _NUMBA:
        raise RuntimeError("impl='kernel' needs numba: pip install numba (or use impl='gather')")
    if x.device.type != "cpu":
        raise RuntimeError(f"impl='kernel' runs on CPU tensors only, got {x.device}")
    trees, nodes, _ = w_in.shape
    xf = _as_f32(x)
    wi, wo = _as_f32(w_in), _as_f32(w_out)
    bi = _as_f32(b_in) if b_in is not None else np.zeros((trees, nodes), dtype=np.float32)
    m = xf.shape[0]
    y = np.empty((m, wo.shape[-1]), dtype=np.float32)
    leaves = np.empty((m, trees), dtype=np.int64)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _tree_forward(xf, wi, bi, wo, depth, act_code, act_on_path, y, leaves)
    return torch.from_numpy(y).to(x.dtype), torch.from_numpy(leaves)


def _as_f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())
