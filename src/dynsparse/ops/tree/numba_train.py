"""Tree FF training on CPU with numba: forward that records paths, backward without per-token weight copies.

The torch gather path materialises every token's path rows ((M, trees*(depth+1), d) copies) and
scatters gradients with index_add. Here:

* forward walks each token (as the inference kernel) and saves only the flat node index and the
  pre-activation z of each (token, tree, level);
* backward pass A, parallel over tokens: dz for each path node (a dot with w_out's row) and the input
  gradient (axpys of w_in's rows) - each token owns its own output, so no races;
* backward pass B, parallel over nodes: tokens are bucketed by the node they visited (a counting
  sort) and each node's w_in/w_out/b_in gradient is summed by one thread - no races, no atomics, and
  nodes no token visited keep exactly zero gradient.
fp32 CPU only (the op's ``torch`` backend serves other dtypes and devices). Outputs are torch-allocated:
numpy-owned storage cannot be resized, which FSDP2 does to gradients.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._numba import FAST, NUMBA, array, as_f32, sync_threads

if NUMBA:
    import numba
    from numba import njit, prange

    from .._numba import act as _act


if NUMBA:

    @njit(inline="always", cache=True)
    def _dact(z, code):
        """d act(z) / dz, matching torch's autograd (relu'(0) = 0)."""
        if code == 0:
            cdf = 0.5 * (1.0 + math.erf(z * 0.7071067811865476))
            return cdf + z * 0.3989422804014327 * math.exp(-0.5 * z * z)
        if code == 1:
            return 1.0 if z > 0.0 else 0.0
        if code == 2:
            s = 1.0 / (1.0 + math.exp(-z))
            return s * (1.0 + z * (1.0 - s))
        if code == 3:
            t = math.tanh(z)
            return 1.0 - t * t
        return 1.0

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _forward(x, w_in, b_in, w_out, nodes, depth, act_code, act_on_path, y, idx, zs):
        """w_in (T*N, d), b_in (T*N,), w_out (T*N, d_out) flat; idx/zs (M, T, depth+1)."""
        m, d = x.shape
        d_out = w_out.shape[1]
        trees = idx.shape[1]
        for i in prange(m):
            xi = x[i]
            yi = y[i]
            yi[:] = 0.0
            h = np.empty(d_out, dtype=np.float32)
            for t in range(trees):
                h[:] = 0.0
                node = 0
                for lev in range(depth + 1):
                    flat = t * nodes + node
                    row = w_in[flat]
                    z = b_in[flat]
                    for k in range(d):
                        z += row[k] * xi[k]
                    idx[i, t, lev] = flat
                    zs[i, t, lev] = z
                    c = z if act_on_path else _act(z, act_code)
                    out = w_out[flat]
                    for j in range(d_out):
                        h[j] += c * out[j]
                    node = 2 * node + 2 if z > 0.0 else 2 * node + 1
                if act_on_path:
                    for j in range(d_out):
                        yi[j] += _act(h[j], act_code)
                else:
                    for j in range(d_out):
                        yi[j] += h[j]

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _backward_tokens(gy, w_in, w_out, idx, zs, act_code, act_on_path, g_x, dz, coeff, g_h):
        """Pass A: per token, dz at every path node, the input gradient, and what pass B needs
        (coeff = act(z) in node mode; g_h = act'(h) * gy per tree in path mode)."""
        m, trees, length = idx.shape
        d = w_in.shape[1]
        d_out = w_out.shape[1]
        for i in prange(m):
            gyi = gy[i]
            gxi = g_x[i]
            gxi[:] = 0.0
            h = np.empty(d_out, dtype=np.float32)
            for t in range(trees):
                if act_on_path:
                    h[:] = 0.0
                    for lev in range(length):
                        out = w_out[idx[i, t, lev]]
                        z = zs[i, t, lev]
                        for j in range(d_out):
                            h[j] += z * out[j]
                    gh = g_h[i, t]
                    for j in range(d_out):
                        gh[j] = _dact(h[j], act_code) * gyi[j]
                    target = gh
                else:
                    target = gyi
                for lev in range(length):
                    n = idx[i, t, lev]
                    out = w_out[n]
                    s = 0.0
                    for j in range(d_out):
                        s += out[j] * target[j]
                    z = zs[i, t, lev]
                    g = s if act_on_path else _dact(z, act_code) * s
                    dz[i, t, lev] = g
                    if not act_on_path:
                        coeff[i, t, lev] = _act(z, act_code)
                    row = w_in[n]
                    for k in range(d):
                        gxi[k] += g * row[k]

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _backward_nodes(x, gy, idx, zs, dz, coeff, g_h, act_on_path, order, starts, entries, g_in, g_b, g_out, n_workers):
        """Pass B: each node's gradients from the (token, tree, level) entries that visited it."""
        m, trees, length = idx.shape
        d = x.shape[1]
        d_out = gy.shape[1]
        n_nodes = order.shape[0]
        per_token = trees * length
        for w in prange(n_workers):
            for r in range(w, n_nodes, n_workers):  # round-robin over nodes sorted by traffic
                n = order[r]
                gin = g_in[n]
                gout = g_out[n]
                gb = 0.0
                for e in range(starts[n], starts[n + 1]):
                    flat = entries[e]
                    i = flat // per_token
                    t = (flat % per_token) // length
                    lev = flat % length
                    g = dz[i, t, lev]
                    gb += g
                    xi = x[i]
                    for k in range(d):
                        gin[k] += g * xi[k]
                    if act_on_path:
                        c = zs[i, t, lev]
                        src = g_h[i, t]
                    else:
                        c = coeff[i, t, lev]
                        src = gy[i]
                    for j in range(d_out):
                        gout[j] += c * src[j]
                g_b[n] = gb

    @njit(cache=True)
    def _bucket(idx, n_flat):
        """Counting sort of the (token, tree, level) entries by the node they visited."""
        flat = idx.ravel()
        counts = np.zeros(n_flat + 1, dtype=np.int64)
        for e in range(flat.shape[0]):
            counts[flat[e] + 1] += 1
        for n in range(n_flat):
            counts[n + 1] += counts[n]
        pos = counts[:n_flat].copy()
        entries = np.empty(flat.shape[0], dtype=np.int64)
        for e in range(flat.shape[0]):
            n = flat[e]
            entries[pos[n]] = e
            pos[n] += 1
        return counts, entries


def tree_train_forward_numba(x, w_in, b_in, w_out, depth, act_code, act_on_path):
    """Returns y (M, d_out), idx (M, T, depth+1) int64 flat node indices (t * nodes + node), zs (same, fp32)."""
    trees, nodes, d = w_in.shape
    d_out = w_out.shape[-1]
    m = x.shape[0]
    sync_threads()
    y = torch.empty(m, d_out, dtype=torch.float32)
    idx = torch.empty(m, trees, depth + 1, dtype=torch.int64)
    zs = torch.empty(m, trees, depth + 1, dtype=torch.float32)
    bi = as_f32(b_in).reshape(-1) if b_in is not None else np.zeros(trees * nodes, dtype=np.float32)
    _forward(as_f32(x), as_f32(w_in).reshape(-1, d), bi, as_f32(w_out).reshape(-1, d_out), nodes, depth,
             act_code, bool(act_on_path), array(y), array(idx), array(zs))
    return y, idx, zs


def tree_train_backward_numba(grad_y, x, w_in, b_in, w_out, idx, zs, act_code, act_on_path):
    """Returns (g_x (M, d), g_w_in (T, N, d), g_b_in (T, N), g_w_out (T, N, d_out)), all fp32."""
    trees, nodes, d = w_in.shape
    d_out = w_out.shape[-1]
    m = x.shape[0]
    sync_threads()
    gy, xf = as_f32(grad_y), as_f32(x)
    wi, wo = as_f32(w_in).reshape(-1, d), as_f32(w_out).reshape(-1, d_out)
    idx_np, zs_np = array(idx.contiguous()), as_f32(zs)
    length = idx.shape[2]
    g_x = torch.empty(m, d, dtype=torch.float32)
    dz = np.empty((m, trees, length), dtype=np.float32)
    coeff = np.empty((m, trees, length) if not act_on_path else (1, 1, 1), dtype=np.float32)
    g_h = np.empty((m, trees, d_out) if act_on_path else (1, 1, 1), dtype=np.float32)
    _backward_tokens(gy, wi, wo, idx_np, zs_np, act_code, bool(act_on_path), array(g_x), dz, coeff, g_h)
    starts, entries = _bucket(idx_np, trees * nodes)
    order = np.argsort(-np.diff(starts), kind="stable")
    g_in = torch.zeros(trees * nodes, d, dtype=torch.float32)
    g_out = torch.zeros(trees * nodes, d_out, dtype=torch.float32)
    g_b = torch.zeros(trees * nodes, dtype=torch.float32)
    _backward_nodes(xf, gy, idx_np, zs_np, dz, coeff, g_h, bool(act_on_path), order, starts, entries,
                    array(g_in), array(g_b), array(g_out), numba.get_num_threads())
    return g_x, g_in.view(trees, nodes, d), g_b.view(trees, nodes), g_out.view(trees, nodes, d_out)
