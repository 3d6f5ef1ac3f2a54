"""The tree ops' ``triton`` backend: CUDA kernels for routing, output and gradients of tree FF layers.

Routing is a chain of dependent dot products (each level's row depends on the previous sign), so a
program owns a block of tokens of one tree and walks it. At few tokens the chain's latency is the
cost, so a program may look ahead: it computes a whole subtree of ``sub`` levels below its node at
once (2**sub - 1 rows loaded together, one round trip) and then picks the path through it in
registers; at many tokens the extra rows cost bandwidth and ``sub`` = 1 walks one row per level.

The output either follows in the same program (``fused``: each tree writes its own fp32 partial,
summed after; cheap when tokens are few) or in a second kernel that owns a tile of (tokens, d_out)
and sums every tree's path rows into it, so trees are reduced in registers in a fixed order. Both
are deterministic. Gradients of rows need atomics (tokens share nodes); the first levels, where a
block of tokens shares few nodes, are reduced inside the block before the atomic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import act, check_act, check_device, check_float, dact, pow2


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _route_kernel(x_ptr, w_in_ptr, b_in_ptr, w_out_ptr, leaves_ptr, idx_ptr, zs_ptr, y_ptr,
                  M, T, D_IN, D_OUT, stride_xm,
                  LEVELS: tl.constexpr, SUB: tl.constexpr, NSUB: tl.constexpr, LPAD: tl.constexpr,
                  HAS_BIAS: tl.constexpr, STORE_PATH: tl.constexpr, FUSE_OUT: tl.constexpr,
                  ACT: tl.constexpr, ON_PATH: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (token block, tree): walk the tree; store leaves, optionally the path and the output."""
    N: tl.constexpr = (1 << LEVELS) - 1
    pid_m = tl.program_id(0)
    t = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_m64 = offs_m.to(tl.int64)

    # slot j of a lookahead subtree (heap order) sits at local level lvl, position j + 1 - p2 there
    jj = tl.arange(0, NSUB)
    p2 = tl.full([NSUB], 1, tl.int32)
    for k in tl.static_range(1, SUB):
        p2 = tl.where(jj + 1 >= (1 << k), 1 << k, p2)
    lvl = tl.zeros([NSUB], tl.int32)
    for k in tl.static_range(1, SUB):
        lvl += (jj + 1 >= (1 << k)).to(tl.int32)

    lev_ids = tl.arange(0, LPAD)
    nodes = tl.zeros([BLOCK_M, LPAD], tl.int32)
    zsv = tl.zeros([BLOCK_M, LPAD], tl.float32)
    node = tl.zeros([BLOCK_M], tl.int32)
    w_in_t = w_in_ptr + t.to(tl.int64) * N * D_IN
    NSTEPS: tl.constexpr = (LEVELS + SUB - 1) // SUB
    for s in tl.static_range(NSTEPS):
        slot_ok = (jj < (1 << SUB) - 1) & (lvl < LEVELS - s * SUB)
        ok2 = m_ok[:, None] & slot_ok[None, :]
        g = (node[:, None] + 1) * p2[None, :] - 1 + (jj + 1 - p2)[None, :]
        g = tl.where(ok2, g, 0)
        g64 = g.to(tl.int64)
        acc = tl.zeros([BLOCK_M, NSUB], tl.float32)
        for k in range(0, D_IN, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D_IN
            xv = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_d[None, :],
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            wv = tl.load(w_in_t + g64[:, :, None] * D_IN + offs_d[None, None, :],
                         mask=ok2[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
            acc += tl.sum(xv[:, None, :] * wv, axis=2)
        if HAS_BIAS:
            acc += tl.load(b_in_ptr + t * N + g, mask=ok2, other=0.0).to(tl.float32)
        cur = tl.zeros([BLOCK_M], tl.int32)
        for l in tl.static_range(SUB):
            if s * SUB + l < LEVELS:
                zl = tl.sum(tl.where(jj[None, :] == cur[:, None], acc, 0.0), axis=1)
                here = lev_ids[None, :] == s * SUB + l
                nodes = tl.where(here, node[:, None], nodes)
                zsv = tl.where(here, zl[:, None], zsv)
                go = (zl > 0).to(tl.int32)
                node = 2 * node + 1 + go
                cur = 2 * cur + 1 + go

    last = tl.sum(tl.where(lev_ids[None, :] == LEVELS - 1, nodes, 0), axis=1)
    tl.store(leaves_ptr + offs_m64 * T + t, (last - ((1 << (LEVELS - 1)) - 1)).to(tl.int64), mask=m_ok)
    if STORE_PATH:
        ok_p = m_ok[:, None] & (lev_ids[None, :] < LEVELS)
        off = (offs_m64[:, None] * T + t) * LEVELS + lev_ids[None, :]
        tl.store(idx_ptr + off, (t * N + nodes).to(tl.int64), mask=ok_p)
        tl.store(zs_ptr + off, zsv, mask=ok_p)
    if FUSE_OUT:
        # y_ptr: (T, M, D_OUT) float32 partials, or y itself when T == 1
        w_out_t = w_out_ptr + t.to(tl.int64) * N * D_OUT
        y_rows = y_ptr + (t * M + offs_m64)[:, None] * D_OUT
        for k in range(0, D_OUT, BLOCK_N):
            offs_n = k + tl.arange(0, BLOCK_N)
            ok_n = m_ok[:, None] & (offs_n < D_OUT)[None, :]
            out = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for l in tl.static_range(LEVELS):
                here = lev_ids[None, :] == l
                nl = tl.sum(tl.where(here, nodes, 0), axis=1).to(tl.int64)
                zl = tl.sum(tl.where(here, zsv, 0.0), axis=1)
                w = tl.load(w_out_t + nl[:, None] * D_OUT + offs_n[None, :], mask=ok_n, other=0.0).to(tl.float32)
                if ON_PATH:
                    out += zl[:, None] * w
                else:
                    out += act(zl, ACT)[:, None] * w
            if ON_PATH:
                out = act(out, ACT)
            tl.store(y_rows + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=ok_n)


@triton.jit
def _out_kernel(idx_ptr, zs_ptr, w_out_ptr, y_ptr, M, T, D_OUT,
                LEVELS: tl.constexpr, ACT: tl.constexpr, ON_PATH: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (token block, d_out block) tile of y: every tree's path rows, summed in tree order."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_n = m_ok[:, None] & (offs_n < D_OUT)[None, :]
    out = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(T):
        h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for l in tl.static_range(LEVELS):
            off = (offs_m64 * T + t) * LEVELS + l
            fl = tl.load(idx_ptr + off, mask=m_ok, other=0)
            zl = tl.load(zs_ptr + off, mask=m_ok, other=0.0)
            w = tl.load(w_out_ptr + fl[:, None] * D_OUT + offs_n[None, :], mask=ok_n, other=0.0).to(tl.float32)
            if ON_PATH:
                h += zl[:, None] * w
            else:
                out += act(zl, ACT)[:, None] * w
        if ON_PATH:
            out += act(h, ACT)
    tl.store(y_ptr + offs_m64[:, None] * D_OUT + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=ok_n)


@triton.jit
def _scatter_rows(ptr, rows, vals, cols, ok, ROW_LEN, first, NPOS: tl.constexpr):
    """ptr[rows[m], cols] += vals[m, :] for the tokens m where ok. NPOS > 0 says every row is one of
    first .. first + NPOS - 1: those are summed over the block first (one atomic per row, not per token)."""
    if NPOS > 0:
        zero64 = tl.max(rows * 0, axis=0)  # an int64 zero, so row * ROW_LEN cannot overflow int32
        for p in tl.static_range(NPOS):
            sel = (rows == first + p)[:, None] & ok
            tot = tl.sum(tl.where(sel, vals, 0.0), axis=0)
            hit = tl.max(sel.to(tl.int32), axis=0) > 0
            tl.atomic_add(ptr + (zero64 + first + p) * ROW_LEN + cols, tot, mask=hit, sem="relaxed")
    else:
        tl.atomic_add(ptr + rows[:, None] * ROW_LEN + cols[None, :], vals, mask=ok, sem="relaxed")


@triton.jit
def _bwd_z_kernel(grad_y_ptr, w_out_ptr, idx_ptr, zs_ptr, gz_ptr, g_w_out_ptr, g_b_ptr,
                  M, T, D_OUT, N,
                  LEVELS: tl.constexpr, LPAD: tl.constexpr, ACT: tl.constexpr, ON_PATH: tl.constexpr,
                  HAS_BIAS: tl.constexpr, PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (token block, tree): dL/dz at every visited node (stored), and the w_out and bias rows' grads."""
    pid_m = tl.program_id(0)
    t = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    lev_ids = tl.arange(0, LPAD)
    ok_p = m_ok[:, None] & (lev_ids[None, :] < LEVELS)
    off = (offs_m64[:, None] * T + t) * LEVELS + lev_ids[None, :]
    flat = tl.load(idx_ptr + off, mask=ok_p, other=0)
    zsv = tl.load(zs_ptr + off, mask=ok_p, other=0.0)
    if not ON_PATH:
        av = act(zsv, ACT)
    g = tl.zeros([BLOCK_M, LPAD], tl.float32)
    for k in range(0, D_OUT, BLOCK_N):
        offs_n = k + tl.arange(0, BLOCK_N)
        ok_n = m_ok[:, None] & (offs_n < D_OUT)[None, :]
        gy = tl.load(grad_y_ptr + offs_m64[:, None] * D_OUT + offs_n[None, :], mask=ok_n, other=0.0).to(tl.float32)
        if ON_PATH:
            h = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for l in tl.static_range(LEVELS):
                here = lev_ids[None, :] == l
                fl = tl.sum(tl.where(here, flat, 0), axis=1)
                zl = tl.sum(tl.where(here, zsv, 0.0), axis=1)
                w = tl.load(w_out_ptr + fl[:, None] * D_OUT + offs_n[None, :], mask=ok_n, other=0.0).to(tl.float32)
                h += zl[:, None] * w
            gy = gy * dact(h, ACT)  # dL/dh of this tree
        for l in tl.static_range(LEVELS):
            here = lev_ids[None, :] == l
            fl = tl.sum(tl.where(here, flat, 0), axis=1)
            w = tl.load(w_out_ptr + fl[:, None] * D_OUT + offs_n[None, :], mask=ok_n, other=0.0).to(tl.float32)
            g += tl.where(here, tl.sum(gy * w, axis=1)[:, None], 0.0)
            if ON_PATH:
                coef = tl.sum(tl.where(here, zsv, 0.0), axis=1)
            else:
                coef = tl.sum(tl.where(here, av, 0.0), axis=1)
            if (1 << l) <= PRE:
                _scatter_rows(g_w_out_ptr, fl, coef[:, None] * gy, offs_n, ok_n, D_OUT,
                              t * N + (1 << l) - 1, 1 << l)
            else:
                _scatter_rows(g_w_out_ptr, fl, coef[:, None] * gy, offs_n, ok_n, D_OUT, 0, 0)
    if not ON_PATH:
        g = g * dact(zsv, ACT)
    tl.store(gz_ptr + off, g, mask=ok_p)
    if HAS_BIAS:
        spread = ok_p
        for l in tl.static_range(LEVELS):
            if (1 << l) <= PRE:  # few nodes at this level: one atomic per node, not per token
                here = lev_ids[None, :] == l
                spread = spread & (lev_ids[None, :] != l)
                for p in tl.static_range(1 << l):
                    sel = here & ok_p & (flat == t * N + (1 << l) - 1 + p)
                    tot = tl.sum(tl.sum(tl.where(sel, g, 0.0), axis=1), axis=0)
                    hit = tl.sum(tl.sum(sel.to(tl.int32), axis=1), axis=0) > 0
                    tl.atomic_add(g_b_ptr + t * N + (1 << l) - 1 + p, tot, mask=hit, sem="relaxed")
        tl.atomic_add(g_b_ptr + flat, g, mask=spread, sem="relaxed")


@triton.jit
def _bwd_x_kernel(x_ptr, w_in_ptr, idx_ptr, gz_ptr, g_x_ptr, g_w_in_ptr, M, T, D_IN, N, stride_xm,
                  LEVELS: tl.constexpr, PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (token block, d block): g_x summed over every tree's path in order, and the w_in rows' grads."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok_d = m_ok[:, None] & (offs_d < D_IN)[None, :]
    xv = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_d[None, :], mask=ok_d, other=0.0).to(tl.float32)
    gx = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t in range(T):
        for l in tl.static_range(LEVELS):
            off = (offs_m64 * T + t) * LEVELS + l
            fl = tl.load(idx_ptr + off, mask=m_ok, other=0)
            gzl = tl.load(gz_ptr + off, mask=m_ok, other=0.0)
            w = tl.load(w_in_ptr + fl[:, None] * D_IN + offs_d[None, :], mask=ok_d, other=0.0).to(tl.float32)
            gx += gzl[:, None] * w
            if (1 << l) <= PRE:
                _scatter_rows(g_w_in_ptr, fl, gzl[:, None] * xv, offs_d, ok_d, D_IN,
                              t * N + (1 << l) - 1, 1 << l)
            else:
                _scatter_rows(g_w_in_ptr, fl, gzl[:, None] * xv, offs_d, ok_d, D_IN, 0, 0)
    tl.store(g_x_ptr + offs_m64[:, None] * D_IN + offs_d[None, :], gx.to(g_x_ptr.dtype.element_ty), mask=ok_d)


# ------------------------------------------------------------------------------------------ host side
def _check(x, w_in, b_in, w_out, depth=None):
    check_float("x", x, 2)
    check_float("w_in", w_in, 3)
    check_float("b_in", b_in, 2)
    check_float("w_out", w_out, 3)
    trees, nodes, d = w_in.shape
    if x.shape[1] != d:
        raise ValueError(f"x has {x.shape[1]} features but w_in rows have {d}")
    if tuple(w_out.shape[:2]) != (trees, nodes):
        raise ValueError(f"w_out must be ({trees}, {nodes}, d_out) like w_in, got {tuple(w_out.shape)}")
    if b_in is not None and tuple(b_in.shape) != (trees, nodes):
        raise ValueError(f"b_in must be ({trees}, {nodes}), got {tuple(b_in.shape)}")
    if depth is not None:
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be an int >= 0, got {depth!r}")
        if nodes != 2 ** (depth + 1) - 1:
            raise ValueError(f"w_in has {nodes} nodes per tree but depth {depth} needs {2 ** (depth + 1) - 1}")
    elif (nodes + 1) & nodes:
        raise ValueError(f"w_in must have 2**(depth+1)-1 nodes per tree, got {nodes}")
    check_device(_route_kernel, x, w_in=w_in, b_in=b_in, w_out=w_out)


def _rows(x):
    return x if x.stride(1) == 1 else x.contiguous()


# enough programs to cover an H200's 132 SMs twice
_TARGET_PROGRAMS = 264
_PLAN_KEYS = {"sub", "fused", "block_m", "block_d", "block_n", "block_m_out", "block_n_out", "num_warps"}


def launch_plan(m: int, trees: int, depth: int, d: int, d_out: int) -> dict:
    """Launch choices for m tokens (see the module doc): lookahead levels, whether the output is fused,
    and token blocks small enough that the routing grid still covers the GPU a couple of times over.
    The thresholds are first guesses, not yet tuned on a GPU: experiments/gpu_bench.py times the variants."""
    levels = depth + 1
    if m <= 8:
        sub = 3
    elif m <= 64:
        sub = 2
    else:
        sub = 1
    sub = min(sub, levels)
    block_m = min(32, _floor_pow2(max(1, m * trees // _TARGET_PROGRAMS)))
    block_m_out = pow2(m, 1, 16)
    rows = triton.cdiv(m, block_m_out)
    block_n_out = 32
    for bn in (256, 128, 64):  # the widest tile that still gives enough programs
        if rows * triton.cdiv(d_out, bn) >= _TARGET_PROGRAMS:
            block_n_out = bn
            break
    return {"sub": sub, "fused": m * trees <= 512, "block_m": block_m, "block_m_out": block_m_out,
            "block_n_out": block_n_out}


def _floor_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _route(x, w_in, b_in, w_out, depth, act_code, act_on_path, store_path, plan_=None):
    """Run the routing kernel; returns (y or None, leaves, idx or None, zs or None)."""
    act_code = check_act(act_code)
    _check(x, w_in, b_in, w_out, depth)
    x = _rows(x)
    w_in, w_out = w_in.contiguous(), w_out.contiguous()
    b_in = None if b_in is None else b_in.contiguous()
    m, d = x.shape
    trees, _, d_out = w_out.shape
    levels = depth + 1
    unknown = set(plan_ or {}) - _PLAN_KEYS
    if unknown:
        raise ValueError(f"plan keys must be among {sorted(_PLAN_KEYS)}, got {sorted(unknown)}")
    p = dict(launch_plan(m, trees, depth, d, d_out), **(plan_ or {}))
    sub, fused, block_m = int(p["sub"]), bool(p["fused"]), int(p["block_m"])
    if not 1 <= sub <= 6:
        raise ValueError(f"plan sub must be in 1..6, got {sub}")
    nsub = pow2((1 << sub) - 1)
    block_d = int(p.get("block_d") or pow2(4096 // (block_m * nsub), 16, pow2(d, 16)))
    block_n = int(p.get("block_n") or pow2(4096 // block_m, 16, min(pow2(d_out, 16), 256)))
    dev = x.device
    leaves = torch.empty(m, trees, dtype=torch.int64, device=dev)
    need_path = store_path or not fused
    idx = torch.empty(m, trees, levels, dtype=torch.int64, device=dev) if need_path else leaves
    zs = torch.empty(m, trees, levels, dtype=torch.float32, device=dev) if need_path else leaves
    y = None
    if fused:
        y = (torch.empty(m, d_out, dtype=x.dtype, device=dev) if trees == 1
             else torch.empty(trees, m, d_out, dtype=torch.float32, device=dev))
    if m == 0:
        y = torch.zeros(m, d_out, dtype=x.dtype, device=dev)
        return y, leaves, idx if store_path else None, zs if store_path else None
    grid = (triton.cdiv(m, block_m), trees)
    _route_kernel[grid](
        x, w_in, b_in if b_in is not None else w_in, w_out, leaves, idx, zs, y if fused else leaves,
        m, trees, d, d_out, x.stride(0),
        LEVELS=levels, SUB=sub, NSUB=nsub, LPAD=pow2(levels), HAS_BIAS=b_in is not None,
        STORE_PATH=need_path, FUSE_OUT=fused, ACT=act_code, ON_PATH=bool(act_on_path),
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=int(p.get("num_warps", 4)))
    if fused:
        if trees > 1:
            y = y.sum(0).to(x.dtype)
    else:
        y = torch.empty(m, d_out, dtype=x.dtype, device=dev)
        block_m_out, block_n_out = int(p["block_m_out"]), int(p["block_n_out"])
        _out_kernel[(triton.cdiv(m, block_m_out), triton.cdiv(d_out, block_n_out))](
            idx, zs, w_out, y, m, trees, d_out,
            LEVELS=levels, ACT=act_code, ON_PATH=bool(act_on_path),
            BLOCK_M=block_m_out, BLOCK_N=block_n_out, num_warps=int(p.get("num_warps", 4)))
    return y, leaves, idx if store_path else None, zs if store_path else None


def tree_infer_triton(x, w_in, b_in, w_out, depth, act_code, act_on_path, *, plan=None):
    """(y (M, d_out) in x's dtype, leaves (M, T) int64: leaf heap index - (2**depth - 1)).

    ``plan`` overrides the launch choices of ``launch_plan()`` (keys sub, fused, block_m, block_d, block_n,
    block_m_out, block_n_out, num_warps), for benchmarks and tests; results do not depend on it."""
    y, leaves, _, _ = _route(x, w_in, b_in, w_out, depth, act_code, act_on_path, False, plan)
    return y, leaves


def tree_train_forward_triton(x, w_in, b_in, w_out, depth, act_code, act_on_path, *, plan=None):
    """(y, idx (M, T, depth+1) int64 flat indices t*N + node of the visited nodes, zs (same) float32 z)."""
    y, _, idx, zs = _route(x, w_in, b_in, w_out, depth, act_code, act_on_path, True, plan)
    return y, idx, zs


def tree_train_backward_triton(grad_y, x, w_in, b_in, w_out, idx, zs, act_code, act_on_path, *, pre=4,
                               block_m=None):
    """(g_x, g_w_in, g_b_in or None, g_w_out): the gradients autograd gives for the reference, with
    routing fixed; rows no token visited are exactly zero. Weight grads accumulate in float32 with
    atomics (their summation order varies run to run); g_x is summed in a fixed order. ``pre``: levels
    whose node count is at most this are summed over a token block before their atomic (0: never)."""
    act_code = check_act(act_code)
    _check(x, w_in, b_in, w_out)
    check_float("grad_y", grad_y, 2)
    m, d = x.shape
    trees, nodes, d_out = w_out.shape
    if tuple(grad_y.shape) != (m, d_out):
        raise ValueError(f"grad_y must be ({m}, {d_out}), got {tuple(grad_y.shape)}")
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (m, trees) or idx.dtype != torch.int64:
        raise ValueError(f"idx must be int64 ({m}, {trees}, depth+1), got {idx.dtype} {tuple(idx.shape)}")
    levels = idx.shape[2]
    if 2**levels - 1 != nodes:
        raise ValueError(f"idx has {levels} levels but the trees have {nodes} nodes")
    if tuple(zs.shape) != tuple(idx.shape):
        raise ValueError(f"zs must have idx's shape {tuple(idx.shape)}, got {tuple(zs.shape)}")
    check_device(_route_kernel, x, grad_y=grad_y, idx=idx, zs=zs)
    x = _rows(x)
    grad_y = grad_y.contiguous()
    w_in, w_out, idx = w_in.contiguous(), w_out.contiguous(), idx.contiguous()
    zs = zs.to(torch.float32).contiguous()
    dev = x.device
    g_w_in = torch.zeros(trees, nodes, d, dtype=torch.float32, device=dev)
    g_w_out = torch.zeros(trees, nodes, d_out, dtype=torch.float32, device=dev)
    g_b = torch.zeros(trees, nodes, dtype=torch.float32, device=dev) if b_in is not None else None
    g_x = torch.empty(m, d, dtype=x.dtype, device=dev)
    if m == 0:
        g_x.zero_()
    else:
        gz = torch.empty(m, trees, levels, dtype=torch.float32, device=dev)
        bm = int(block_m or pow2(m, 1, 16))
        block_n = pow2(4096 // bm, 16, min(pow2(d_out, 16), 128))
        _bwd_z_kernel[(triton.cdiv(m, bm), trees)](
            grad_y, w_out, idx, zs, gz, g_w_out, g_b if g_b is not None else g_w_out,
            m, trees, d_out, nodes,
            LEVELS=levels, LPAD=pow2(levels), ACT=act_code, ON_PATH=bool(act_on_path), HAS_BIAS=g_b is not None,
            PRE=int(pre), BLOCK_M=bm, BLOCK_N=block_n)
        block_d = pow2(4096 // bm, 16, min(pow2(d, 16), 128))
        _bwd_x_kernel[(triton.cdiv(m, bm), triton.cdiv(d, block_d))](
            x, w_in, idx, gz, g_x, g_w_in, m, trees, d, nodes, x.stride(0),
            LEVELS=levels, PRE=int(pre), BLOCK_M=bm, BLOCK_D=block_d)
    return (g_x, g_w_in.to(w_in.dtype), None if g_b is None else g_b.to(b_in.dtype), g_w_out.to(w_out.dtype))
