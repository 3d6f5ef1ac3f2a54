"""Tree FF inference on CPU with numba: one fused root-to-leaf walk per token and tree.

Each token reads only depth+1 rows of w_in and w_out per tree (a dot product, then an axpy), so the
work is trees * (depth+1) * (d + d_out) multiply-adds instead of a dense MLP's d * width * 2.

What makes it fast:
* SIMD dot products (reassociated partial sums, see ``ops._numba.FAST``) and axpys;
* four tokens walk together: at a node they share, its w_in row is loaded once for four dots and its
  w_out row once for four axpys (shallow nodes are shared by most tokens; deep ones rarely);
* small batches (the generation case) run a serial kernel: no thread start-up for a few microseconds
  of work; large batches split tokens over torch's thread count.
Compiled on first use and cached on disk. Inference only: no autograd.
"""
from __future__ import annotations

import numpy as np
import torch

from .._numba import FAST, NUMBA, array, as_f32, sync_threads, weight_table, weight_view

if NUMBA:
    import numba
    from numba import njit, prange

    from .._numba import act as _act
    from .._numba import load

# Below this many multiply-adds (~0.1-0.2 ms on one core) the serial kernel runs: waking the
# thread pool costs ~10-50 us on an idle machine and far more when other processes hold the cores.
PARALLEL_MIN_WORK = 1 << 21


if NUMBA:

    @njit(inline="always", fastmath=FAST, cache=True)
    def _accumulate(acc, w_out, t, path, coef, length):
        """acc += sum over the path of coef[l] * w_out[t, path[l]], four rows per pass over acc
        (one read-modify-write of acc per four rows instead of one per row)."""
        d_out = acc.shape[0]
        lev = 0
        while lev + 4 <= length:
            o0, o1, o2, o3 = w_out[t, path[lev]], w_out[t, path[lev + 1]], w_out[t, path[lev + 2]], w_out[t, path[lev + 3]]
            c0, c1, c2, c3 = coef[lev], coef[lev + 1], coef[lev + 2], coef[lev + 3]
            for j in range(d_out):
                acc[j] += c0 * load(o0, j) + c1 * load(o1, j) + c2 * load(o2, j) + c3 * load(o3, j)
            lev += 4
        while lev < length:
            o0 = w_out[t, path[lev]]
            c0 = coef[lev]
            for j in range(d_out):
                acc[j] += c0 * load(o0, j)
            lev += 1

    @njit(inline="always", fastmath=FAST, cache=True)
    def _finish(yi, acc, t, path, coef, w_out, depth, act_code, act_on_path):
        """Add one tree's path to the token's output: sum_l act(z_l) w_out (node) or act(sum_l z_l w_out) (path)."""
        if act_on_path:
            acc[:] = 0.0
            _accumulate(acc, w_out, t, path, coef, depth + 1)
            for j in range(yi.shape[0]):
                yi[j] += _act(acc[j], act_code)
        else:
            for lev in range(depth + 1):
                coef[lev] = _act(coef[lev], act_code)
            _accumulate(yi, w_out, t, path, coef, depth + 1)

    @njit(inline="always", fastmath=FAST, cache=True)
    def _walk1(xi, w_in, b_in, w_out, t, depth, act_code, act_on_path, yi, h, path, coef):
        """One token down tree t: route (dot products), then add its path's output to yi.
        Returns the leaf's heap index."""
        d = xi.shape[0]
        node = 0
        for lev in range(depth + 1):
            row = w_in[t, node]
            z = b_in[t, node]
            for k in range(d):
                z += load(row, k) * xi[k]
            path[lev] = node
            coef[lev] = z
            node = 2 * node + 2 if z > 0.0 else 2 * node + 1
        _finish(yi, h, t, path, coef, w_out, depth, act_code, act_on_path)
        return path[depth]

    @njit(inline="always", fastmath=FAST, cache=True)
    def _walk4(x, i, w_in, b_in, w_out, t, depth, act_code, act_on_path, y, h, paths, coefs, leaf):
        """Tokens i..i+3 route down tree t together (a row of a node they share is read once for
        four dot products), then each adds its path's output."""
        d = x.shape[1]
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        n0 = n1 = n2 = n3 = 0
        for lev in range(depth + 1):
            if n0 == n1 and n0 == n2 and n0 == n3:
                row = w_in[t, n0]
                b = b_in[t, n0]
                z0, z1, z2, z3 = b, b, b, b
                for k in range(d):
                    r = load(row, k)
                    z0 += r * x0[k]
                    z1 += r * x1[k]
                    z2 += r * x2[k]
                    z3 += r * x3[k]
            else:
                r0, r1, r2, r3 = w_in[t, n0], w_in[t, n1], w_in[t, n2], w_in[t, n3]
                z0, z1, z2, z3 = b_in[t, n0], b_in[t, n1], b_in[t, n2], b_in[t, n3]
                for k in range(d):
                    z0 += load(r0, k) * x0[k]
                    z1 += load(r1, k) * x1[k]
                    z2 += load(r2, k) * x2[k]
                    z3 += load(r3, k) * x3[k]
            paths[0, lev], paths[1, lev], paths[2, lev], paths[3, lev] = n0, n1, n2, n3
            coefs[0, lev], coefs[1, lev], coefs[2, lev], coefs[3, lev] = z0, z1, z2, z3
            n0 = 2 * n0 + 2 if z0 > 0.0 else 2 * n0 + 1
            n1 = 2 * n1 + 2 if z1 > 0.0 else 2 * n1 + 1
            n2 = 2 * n2 + 2 if z2 > 0.0 else 2 * n2 + 1
            n3 = 2 * n3 + 2 if z3 > 0.0 else 2 * n3 + 1
        for q in range(4):
            _finish(y[i + q], h[q], t, paths[q], coefs[q], w_out, depth, act_code, act_on_path)
            leaf[q] = paths[q, depth]

    @njit(inline="always", fastmath=FAST, cache=True)
    def _walk_trees4(xi, w_in, b_in, w_out, t, depth, act_code, act_on_path, yi, h, paths, coefs, leaf):
        """One token down trees t..t+3 together: four independent chains of row reads in flight (a
        lone token in a forest otherwise waits for each level's row before it can ask for the next),
        and each load of x serves four dot products."""
        n0 = n1 = n2 = n3 = 0
        for lev in range(depth + 1):
            r0, r1, r2, r3 = w_in[t, n0], w_in[t + 1, n1], w_in[t + 2, n2], w_in[t + 3, n3]
            z0, z1, z2, z3 = b_in[t, n0], b_in[t + 1, n1], b_in[t + 2, n2], b_in[t + 3, n3]
            for k in range(xi.shape[0]):
                xk = xi[k]
                z0 += load(r0, k) * xk
                z1 += load(r1, k) * xk
                z2 += load(r2, k) * xk
                z3 += load(r3, k) * xk
            paths[0, lev], paths[1, lev], paths[2, lev], paths[3, lev] = n0, n1, n2, n3
            coefs[0, lev], coefs[1, lev], coefs[2, lev], coefs[3, lev] = z0, z1, z2, z3
            n0 = 2 * n0 + 2 if z0 > 0.0 else 2 * n0 + 1
            n1 = 2 * n1 + 2 if z1 > 0.0 else 2 * n1 + 1
            n2 = 2 * n2 + 2 if z2 > 0.0 else 2 * n2 + 1
            n3 = 2 * n3 + 2 if z3 > 0.0 else 2 * n3 + 1
        for q in range(4):
            _finish(yi, h[q], t + q, paths[q], coefs[q], w_out, depth, act_code, act_on_path)
            leaf[q] = paths[q, depth]

    @njit(inline="always", fastmath=FAST, cache=True)
    def _block(x, i0, i1, w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves):
        """Tokens i0..i1-1 through every tree, tree by tree (so a tree's upper levels stay in cache
        for the whole block): groups of four tokens, then the rest one by one, four trees at a time."""
        trees = w_in.shape[0]
        d_out = y.shape[1]
        first_leaf = (1 << depth) - 1
        h = np.empty((4, d_out), dtype=np.float32)
        leaf = np.empty(4, dtype=np.int64)
        paths = np.empty((4, depth + 1), dtype=np.int64)
        coefs = np.empty((4, depth + 1), dtype=np.float32)
        for i in range(i0, i1):
            y[i, :] = 0.0
        full = i0 + (i1 - i0) // 4 * 4
        for t in range(trees):
            for i in range(i0, full, 4):
                _walk4(x, i, w_in, b_in, w_out, t, depth, act_code, act_on_path, y, h, paths, coefs, leaf)
                for q in range(4):
                    leaves[i + q, t] = leaf[q] - first_leaf
        for i in range(full, i1):  # the last 0-3 tokens: four trees at a time
            t = 0
            while t + 4 <= trees:
                _walk_trees4(x[i], w_in, b_in, w_out, t, depth, act_code, act_on_path, y[i], h, paths, coefs, leaf)
                for q in range(4):
                    leaves[i, t + q] = leaf[q] - first_leaf
                t += 4
            while t < trees:
                leaves[i, t] = _walk1(
                    x[i], w_in, b_in, w_out, t, depth, act_code, act_on_path, y[i], h[0], paths[0], coefs[0]
                ) - first_leaf
                t += 1

    @njit(fastmath=FAST, cache=True)
    def _tree_forward_serial(x, w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves):
        _block(x, 0, x.shape[0], w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves)

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _tree_forward_parallel(x, w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves, tasks):
        m = x.shape[0]
        # One contiguous block per thread (a multiple of 4 tokens): within a block each tree is
        # walked by every token before the next tree, so its upper levels are read from cache;
        # smaller blocks would re-read every tree's rows once per block.
        step = ((m + tasks - 1) // tasks + 3) // 4 * 4
        for b in prange((m + step - 1) // step):
            _block(x, b * step, min(m, (b + 1) * step), w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves)


def run_tree_kernel(x, w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves) -> None:
    """The kernel on numpy arrays (float32, C-contiguous): fills y (M, d_out) and leaves (M, T).

    The module's inference fast path calls this with cached weight views; everything else goes
    through ``tree_infer_numba``. Small batches run serially, large ones on torch's thread count.
    """
    if x.shape[0] * w_in.shape[0] * (depth + 1) * (x.shape[1] + w_out.shape[-1]) < PARALLEL_MIN_WORK:
        _tree_forward_serial(x, w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves)
    else:
        sync_threads()
        _tree_forward_parallel(x, w_in, b_in, w_out, depth, act_code, act_on_path, y, leaves, numba.get_num_threads())


def tree_infer_numba(x, w_in, b_in, w_out, depth, act_code, act_on_path):
    """x: (M, d) -> (y (M, d_out), leaves (M, T) int64), computed in fp32 and returned in x's dtype.

    bfloat16 weight tables are read as bfloat16 (half the memory traffic) and widened in registers;
    other dtypes are converted to float32. Outputs are torch-allocated (resizable storage, so FSDP2 and
    autograd may free or reuse them).

    Routing uses SIMD partial sums, so a token whose |z| at some node is within float rounding of 0
    may turn differently than a sequential sum would; any such token is a tie under either order.
    """
    trees, nodes, _ = w_in.shape
    xf = as_f32(x)
    wi, wo = weight_table(w_in), weight_table(w_out)
    bi = weight_view(b_in) if b_in is not None else np.zeros((trees, nodes), dtype=np.float32)
    m = xf.shape[0]
    y = torch.empty(m, wo.shape[-1], dtype=torch.float32)
    leaves = torch.empty(m, trees, dtype=torch.int64)
    run_tree_kernel(xf, wi, bi, wo, depth, act_code, bool(act_on_path), array(y), array(leaves))
    return (y if x.dtype == torch.float32 else y.to(x.dtype)), leaves
