"""The sparse MLP ops' ``triton`` backend: CUDA kernels for per-token neuron lists (CSR) and group lists.

Two kernels. The first computes the hidden value of every listed neuron of every token (one dot
product per neuron, or two for a GLU) into a flat scratch array laid out like the lists; programs
of a token stride over its list, so one token still spreads over many programs while many tokens
take one program each. The second owns a (token, d_out block) tile and sums the listed rows of
w2_t weighted by those hidden values, in list order; at few tokens it splits the list into parts
whose float32 partials are summed after, so the weight rows still stream through many SMs. Both
are deterministic (no atomics).

List entries are not range-checked here (that would cost a device synchronisation); callers
build them from the layer's own width.

``relu_skip_mlp`` and ``gate_skip_mlp`` compute their dense projection (fc1, or the gate) with cuBLAS,
list each token's non-zero (kept) neurons from it, and run the same second kernel over those lists;
for a GLU gate skip the first kernel computes the kept neurons' up projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ... import activations
from .._triton import act, check_act, check_device, check_float, pow2
from .csr import csr_from_mask

STRATEGIES = ("token", "union", "grouped")
# enough programs to fill an H200's 132 SMs a few times over
_TARGET_PROGRAMS = 528


@triton.jit
def _hidden_kernel(x_ptr, w1_ptr, b1_ptr, wg_ptr, bg_ptr, off_ptr, indptr_ptr, indices_ptr, h_ptr,
                   D_IN, stride_xm, PARTS,
                   G: tl.constexpr, GLU: tl.constexpr, HAS_B1: tl.constexpr, HAS_BG: tl.constexpr,
                   HAS_OFF: tl.constexpr, ACT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token i, part p): h of list slots p*BLOCK_J, (p+PARTS)*BLOCK_J, ... of token i."""
    i = tl.program_id(0)
    p = tl.program_id(1)
    start = tl.load(indptr_ptr + i) * G
    end = tl.load(indptr_ptr + i + 1) * G
    x_row = x_ptr + i.to(tl.int64) * stride_xm
    for c in range(start + p * BLOCK_J, end, PARTS * BLOCK_J):
        s = c + tl.arange(0, BLOCK_J)
        ok = s < end
        j = tl.load(indices_ptr + s // G, mask=ok, other=0).to(tl.int64) * G + s % G
        z = tl.zeros([BLOCK_J], tl.float32)
        if GLU:
            zg = tl.zeros([BLOCK_J], tl.float32)
        for k in range(0, D_IN, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D_IN
            xv = tl.load(x_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            ok2 = ok[:, None] & d_ok[None, :]
            w = tl.load(w1_ptr + j[:, None] * D_IN + offs_d[None, :], mask=ok2, other=0.0).to(tl.float32)
            z += tl.sum(w * xv[None, :], axis=1)
            if GLU:
                wg = tl.load(wg_ptr + j[:, None] * D_IN + offs_d[None, :], mask=ok2, other=0.0).to(tl.float32)
                zg += tl.sum(wg * xv[None, :], axis=1)
        if HAS_B1:
            z += tl.load(b1_ptr + j, mask=ok, other=0.0).to(tl.float32)
        if GLU:
            if HAS_BG:
                zg += tl.load(bg_ptr + j, mask=ok, other=0.0).to(tl.float32)
            h = act(zg, ACT) * z
        else:
            h = act(z, ACT)
        if HAS_OFF:
            h -= tl.load(off_ptr + j, mask=ok, other=0.0).to(tl.float32)
        tl.store(h_ptr + s, h, mask=ok)


@triton.jit
def _out_kernel(h_ptr, w2_ptr, b2_ptr, indptr_ptr, indices_ptr, y_ptr, M, D_OUT, PARTS,
                G: tl.constexpr, HAS_B2: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (token i, d_out block, part p): sum of h_j w2_t[j] over slots p*BLOCK_J, (p+PARTS)*BLOCK_J, ...
    into y (PARTS == 1, plus b2) or into float32 partials (PARTS, M, D_OUT)."""
    i = tl.program_id(0)
    pid_n = tl.program_id(1)
    p = tl.program_id(2)
    start = tl.load(indptr_ptr + i) * G
    end = tl.load(indptr_ptr + i + 1) * G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D_OUT
    acc = tl.zeros([BLOCK_J, BLOCK_N], tl.float32)
    for c in range(start + p * BLOCK_J, end, PARTS * BLOCK_J):
        s = c + tl.arange(0, BLOCK_J)
        ok = s < end
        j = tl.load(indices_ptr + s // G, mask=ok, other=0).to(tl.int64) * G + s % G
        h = tl.load(h_ptr + s, mask=ok, other=0.0)
        w = tl.load(w2_ptr + j[:, None] * D_OUT + offs_n[None, :], mask=ok[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += h[:, None] * w
    out = tl.sum(acc, axis=0)
    if HAS_B2:
        out += tl.load(b2_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    row = (p.to(tl.int64) * M + i) * D_OUT
    tl.store(y_ptr + row + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


def _check_vec(name, t, n):
    check_float(name, t, 1)
    if t is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries, got {t.shape[0]}")


_PLAN_KEYS = {"block_j", "block_d", "block_n", "parts_h", "parts_out", "num_warps"}


def launch_plan(m: int, d_ff: int, d_out: int, slots_per_token: int) -> dict:
    """Launch choices for m tokens: programs per token in each kernel, block sizes (see the module doc).
    First guesses, not yet tuned on a GPU: experiments/gpu_bench.py times the variants."""
    block_j = 32
    chunks = max(1, triton.cdiv(slots_per_token, block_j))
    block_n = pow2(d_out, 16, 128)
    n_blocks = triton.cdiv(d_out, block_n)
    parts_h = max(1, min(chunks, triton.cdiv(_TARGET_PROGRAMS, m)))
    parts_out = max(1, min(chunks, _TARGET_PROGRAMS // max(1, m * n_blocks)))
    return {"block_j": block_j, "block_n": block_n, "parts_h": parts_h, "parts_out": parts_out}


def sparse_mlp_triton(x, w1, b1, w2_t, b2, wg, bg, offset, indptr, indices, strategy, group_size, act_code,
                      *, plan=None):
    """y (M, d_out) in x's dtype: y[i] = b2 + sum over listed neurons j of h_j w2_t[j], with
    h_j = act(w1_j.x + b1_j) - offset_j, or act(wg_j.x + bg_j) * (w1_j.x + b1_j) - offset_j when wg
    is given. Lists are CSR rows (indptr int64 (M+1,), indices int32): neuron indices for 'token' and
    'union', group indices g (neurons g*group_size .. g*group_size+group_size-1) for 'grouped'.
    ``plan`` overrides the launch choices of ``launch_plan()`` (keys block_j, block_d, block_n, parts_h,
    parts_out, num_warps); results do not depend on it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    act_code = check_act(act_code)
    check_float("x", x, 2)
    check_float("w1", w1, 2)
    check_float("w2_t", w2_t, 2)
    check_float("wg", wg, 2)
    m, d = x.shape
    d_ff = w1.shape[0]
    d_out = w2_t.shape[1]
    if w1.shape[1] != d:
        raise ValueError(f"w1 must be (d_ff, {d}) for x's {d} features, got {tuple(w1.shape)}")
    if w2_t.shape[0] != d_ff:
        raise ValueError(f"w2_t must be ({d_ff}, d_out) like w1's rows, got {tuple(w2_t.shape)}")
    if wg is not None and tuple(wg.shape) != tuple(w1.shape):
        raise ValueError(f"wg must have w1's shape {tuple(w1.shape)}, got {tuple(wg.shape)}")
    if wg is None and bg is not None:
        raise ValueError("bg given without wg")
    _check_vec("b1", b1, d_ff)
    _check_vec("bg", bg, d_ff)
    _check_vec("offset", offset, d_ff)
    _check_vec("b2", b2, d_out)
    if not isinstance(indptr, torch.Tensor) or indptr.dtype != torch.int64 or tuple(indptr.shape) != (m + 1,):
        raise ValueError(f"indptr must be an int64 tensor of shape ({m + 1},), got "
                         f"{getattr(indptr, 'dtype', type(indptr).__name__)} {tuple(getattr(indptr, 'shape', ()))}")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise ValueError(f"indices must be a 1-D int32 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    g = int(group_size) if strategy == "grouped" else 1
    if strategy == "grouped" and (g < 1 or d_ff % g):
        raise ValueError(f"group_size must be >= 1 and divide d_ff={d_ff}, got {group_size!r}")
    check_device(_hidden_kernel, x, w1=w1, b1=b1, w2_t=w2_t, b2=b2, wg=wg, bg=bg, offset=offset, indptr=indptr,
                 indices=indices)
    x = x if x.stride(1) == 1 else x.contiguous()
    w1, w2_t = w1.contiguous(), w2_t.contiguous()
    wg = None if wg is None else wg.contiguous()
    b1, b2, bg, offset = (None if v is None else v.contiguous() for v in (b1, b2, bg, offset))
    indptr, indices = indptr.contiguous(), indices.contiguous()
    dev = x.device
    nnz = indices.numel() * g
    if m == 0 or nnz == 0:
        return _only_b2(m, d_out, b2, x)
    block_j, block_d, block_n, parts_h, parts_out, warps = _plan(m, d_ff, d_out, d, nnz, plan)
    h = torch.empty(nnz, dtype=torch.float32, device=dev)
    dummy = h
    _hidden_kernel[(m, parts_h)](
        x, w1, dummy if b1 is None else b1, dummy if wg is None else wg, dummy if bg is None else bg,
        dummy if offset is None else offset, indptr, indices, h, d, x.stride(0), parts_h,
        G=g, GLU=wg is not None, HAS_B1=b1 is not None, HAS_BG=bg is not None, HAS_OFF=offset is not None,
        ACT=act_code, BLOCK_J=block_j, BLOCK_D=block_d, num_warps=warps)
    return _down(h, w2_t, b2, indptr, indices, m, x.dtype, g, block_j, block_n, parts_out, warps)


def _down(h, w2_t, b2, indptr, indices, m, dtype, g, block_j, block_n, parts_out, warps):
    """y (m, d_out) in ``dtype``: b2 + sum over each token's listed slots of h[slot] w2_t[j] (the second kernel)."""
    d_out = w2_t.shape[1]
    if parts_out == 1:
        y = torch.empty(m, d_out, dtype=dtype, device=h.device)
    else:
        y = torch.empty(parts_out, m, d_out, dtype=torch.float32, device=h.device)
    _out_kernel[(m, triton.cdiv(d_out, block_n), parts_out)](
        h, w2_t, h if b2 is None or parts_out > 1 else b2, indptr, indices, y, m, d_out, parts_out,
        G=g, HAS_B2=b2 is not None and parts_out == 1, BLOCK_J=block_j, BLOCK_N=block_n, num_warps=warps)
    if parts_out > 1:
        y = y.sum(0)
        if b2 is not None:
            y += b2.float()
        y = y.to(dtype)
    return y


def _only_b2(m, d_out, b2, x):
    """The output of empty lists (or of no tokens): b2, or zeros, in x's dtype."""
    y = torch.zeros(m, d_out, dtype=torch.float32, device=x.device)
    return (y if b2 is None else y + b2.float()).to(x.dtype)


def _plan(m, d_ff, d_out, d, nnz, plan):
    """(block_j, block_d, block_n, parts_h, parts_out, num_warps): ``launch_plan`` for nnz list slots (no
    token's list is longer than the layer, a bound that needs no read-back of indptr), overridden by ``plan``."""
    unknown = set(plan or {}) - _PLAN_KEYS
    if unknown:
        raise ValueError(f"plan keys must be among {sorted(_PLAN_KEYS)}, got {sorted(unknown)}")
    p = dict(launch_plan(m, d_ff, d_out, min(d_ff, max(nnz, 1))), **(plan or {}))
    block_j = int(p["block_j"])
    block_d = int(p.get("block_d") or pow2(4096 // block_j, 16, pow2(d, 16)))
    return block_j, block_d, int(p["block_n"]), int(p["parts_h"]), int(p["parts_out"]), int(p.get("num_warps", 4))


def _skip_checks(x, w1, b1, w2_t, b2, wg=None, bg=None, offset=None):
    for name, t in (("x", x), ("w1", w1), ("w2_t", w2_t), ("wg", wg)):
        check_float(name, t, 2)
    d_ff, d = w1.shape
    if x.shape[1] != d or w2_t.shape[0] != d_ff or (wg is not None and tuple(wg.shape) != tuple(w1.shape)):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2_t {tuple(w2_t.shape)}"
                         + ("" if wg is None else f", wg {tuple(wg.shape)}"))
    for name, t, n in (("b1", b1, d_ff), ("bg", bg, d_ff), ("offset", offset, d_ff), ("b2", b2, w2_t.shape[1])):
        _check_vec(name, t, n)
    check_device(_out_kernel, x, w1=w1, b1=b1, w2_t=w2_t, b2=b2, wg=wg, bg=bg, offset=offset)


def relu_skip_mlp_triton(x, w1, b1, w2_t, b2, *, plan=None):
    """fc2(relu(fc1(x))) exactly: fc1 dense (cuBLAS), fc2 over each token's non-zero activations only."""
    _skip_checks(x, w1, b1, w2_t, b2)
    m, d = x.shape
    if m == 0:
        return _only_b2(m, w2_t.shape[1], b2, x)
    a = F.relu(F.linear(x.float(), w1.float(), None if b1 is None else b1.float()))
    keep = a > 0
    indptr, indices = csr_from_mask(keep)
    block_j, _, block_n, _, parts_out, warps = _plan(m, w1.shape[0], w2_t.shape[1], d, indices.numel(), plan)
    return _down(a[keep], w2_t.contiguous(), None if b2 is None else b2.contiguous(), indptr, indices, m, x.dtype,
                 1, block_j, block_n, parts_out, warps)


def gate_skip_mlp_triton(x, w1, b1, w2_t, b2, wg, bg, offset, threshold, act_code, *, plan=None):
    """The CATS form: the gate dense (cuBLAS), a = act(gate), neurons with |a| <= threshold skipped; for a
    GLU the kept neurons' up projections come from the first kernel, h = a * (w1_j.x + b1_j); then
    h - offset through the second kernel."""
    act_code = check_act(act_code)
    _skip_checks(x, w1, b1, w2_t, b2, wg, bg, offset)
    m, d = x.shape
    if m == 0:
        return _only_b2(m, w2_t.shape[1], b2, x)
    gate, gate_bias = (w1, b1) if wg is None else (wg, bg)
    a = activations.by_code(act_code).fn(F.linear(x.float(), gate.float(),
                                                  None if gate_bias is None else gate_bias.float()))
    keep = a.abs() > threshold
    indptr, indices = csr_from_mask(keep)
    block_j, block_d, block_n, parts_h, parts_out, warps = _plan(m, w1.shape[0], w2_t.shape[1], d, indices.numel(),
                                                                 plan)
    h = a[keep]
    if wg is not None and h.numel():
        x = x if x.stride(1) == 1 else x.contiguous()
        up = torch.empty_like(h)
        b1c = None if b1 is None else b1.contiguous()
        _hidden_kernel[(m, parts_h)](
            x, w1.contiguous(), up if b1c is None else b1c, up, up, up, indptr, indices, up, d, x.stride(0), parts_h,
            G=1, GLU=False, HAS_B1=b1c is not None, HAS_BG=False, HAS_OFF=False, ACT=activations.code("identity"),
            BLOCK_J=block_j, BLOCK_D=block_d, num_warps=warps)
        h = h * up
    if offset is not None:
        h = h - offset.float()[indices.long()]
    return _down(h, w2_t.contiguous(), None if b2 is None else b2.contiguous(), indptr, indices, m, x.dtype, 1,
                 block_j, block_n, parts_out, warps)
