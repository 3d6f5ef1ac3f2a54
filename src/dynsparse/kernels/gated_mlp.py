"""Gated sparse MLP execution on CPU: gates that emit index lists, and MLPs that touch only those neurons.

An MLP block ``y = fc2(act(fc1(x)))`` whose activations are mostly zero (ReLU) or gated off (MGS) wastes
most of its work. These kernels read only the weight rows of active neurons:

* gates (``lowrank_gate_indices``, ``grouped_gate_indices``) write each token's active neurons straight
  into CSR lists (``indptr`` int64 (M+1,), ``indices`` int32 (nnz,)); a dense d_ff-wide bool mask and a
  nonzero() pass would cost as much as the sparse MLP itself;
* ``sparse_mlp`` works per token: for each listed neuron a dot with an fc1 row, then an axpy with the
  matching row of fc2's transpose (``w2_t`` (d_ff, d_out), contiguous, so both reads are rows);
* ``union_sparse_mlp`` serves batches whose active sets overlap: gather the union's rows once, run
  dense matmuls, mask each token back to its own set;
* ``relu_skip_mlp`` is the exact ReLU baseline: dense fc1, then fc2 over each token's non-zeros only;
* ``gated_sparse_mlp`` picks per-token or union from the measured sizes.

Gated (GLU, Llama-style) blocks ``y = fc2(act(gate(x)) * up(x))`` pass the gate projection as
``wg``/``bg`` to any MLP kernel: a listed neuron then costs two dots (gate row and up row, ``w1`` being the
up projection) and one axpy, and ``act`` applies to the gate's pre-activation only.

``offset`` (d_ff,), optional, is subtracted from every computed hidden value: h_j = act(z_j) - offset[j].
MGS compensation (a skipped neuron counts as its mean c_j) is then exact and still sparse:
y = (b2 + W2 c) + sum over listed j of (act(z_j) - c_j) w2_j.

Every kernel computes in float32 and returns x's dtype. Each has a pure-torch path (used when numba
is missing, and by the tests as the reference). Activation codes: gelu 0, relu 1, silu 2, tanh 3,
identity 4 (``dynsparse.tree.activations.ACTIVATION_CODES``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._common import FAST, NUMBA, as_f32, sync_threads, weight_view

if NUMBA:
    import numba
    from numba import njit, prange

    from ._common import act as _act

ACT_FUNCTIONS = {0: F.gelu, 1: F.relu, 2: F.silu, 3: torch.tanh, 4: lambda z: z}

# Union path vs per-token path: the union runs dense BLAS over |union| rows for every token, the
# per-token path does nnz dot+axpy pairs at a lower rate. Union wins when M * |union| < UNION_SPEEDUP * nnz,
# i.e. when the tokens' lists overlap by more than 1/UNION_SPEEDUP. Measured with ``dynsparse bench mgs``
# (256-2048-256, 10 % per token, 2 threads, idle AMD EPYC): at 256 and 850 tokens the union is 2.0x faster
# at full overlap, 1.2x at 0.4 and 0.5-0.6x at 0.2, so the break-even sits near 0.3; at 64 tokens its fixed
# costs (gathering the union's rows) push break-even to ~0.7, hence the minimum batch.
UNION_SPEEDUP = 3.0
UNION_MIN_TOKENS = 128
# Below this many multiply-adds (~0.1-0.2 ms on one core) the per-token kernel runs on one thread:
# waking the pool costs more than it saves, and far more when other processes hold the cores.
PARALLEL_MIN_WORK = 1 << 21


# ---------------------------------------------------------------------------------------------- checks
def _check_x(x: torch.Tensor, d: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"x must have shape (M, {d}) to match {what}, got {tuple(x.shape)}")


def _check_csr(indptr: torch.Tensor, indices: torch.Tensor, m: int, n: int, name: str = "indices") -> None:
    """CSR lists over n columns (neurons, or groups with name="groups") for m tokens."""
    if indptr.dtype != torch.int64 or indptr.dim() != 1 or indptr.numel() != m + 1:
        raise ValueError(f"indptr must be int64 of shape ({m + 1},), got {indptr.dtype} {tuple(indptr.shape)}")
    if indices.dtype != torch.int32 or indices.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if int(indptr[0]) != 0 or int(indptr[-1]) != indices.numel() or bool((indptr[1:] < indptr[:-1]).any()):
        raise ValueError(f"indptr must start at 0, never decrease and end at len({name})")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"{name} must lie in [0, {n})")


def _thresholds(threshold, n: int) -> torch.Tensor:
    t = torch.as_tensor(threshold, dtype=torch.float32).detach()
    if t.dim() == 0:
        return t.expand(n).contiguous()
    if t.shape != (n,):
        raise ValueError(f"threshold must be a scalar or have shape ({n},), got {tuple(t.shape)}")
    return t.contiguous()


def _check_mlp(x, w1, b1, w2_t, b2):
    if w1.dim() != 2 or w2_t.dim() != 2 or w1.shape[0] != w2_t.shape[0]:
        raise ValueError(
            f"w1 must be (d_ff, d) and w2_t (d_ff, d_out) with the same d_ff, got {tuple(w1.shape)} and {tuple(w2_t.shape)}"
        )
    _check_x(x, w1.shape[1], "w1 (d_ff, d)")
    if b1 is not None and b1.shape != (w1.shape[0],):
        raise ValueError(f"b1 must have shape ({w1.shape[0]},), got {tuple(b1.shape)}")
    if b2 is not None and b2.shape != (w2_t.shape[1],):
        raise ValueError(f"b2 must have shape ({w2_t.shape[1]},), got {tuple(b2.shape)}")


def _check_glu(w1, wg, bg) -> None:
    if wg is None:
        if bg is not None:
            raise ValueError("bg was given without wg (the gate projection of a gated MLP)")
        return
    if wg.shape != w1.shape:
        raise ValueError(f"wg (gate projection) must have w1's shape {tuple(w1.shape)}, got {tuple(wg.shape)}")
    if bg is not None and bg.shape != (w1.shape[0],):
        raise ValueError(f"bg must have shape ({w1.shape[0]},), got {tuple(bg.shape)}")


def _check_offset(offset, d_ff: int) -> None:
    if offset is not None and offset.shape != (d_ff,):
        raise ValueError(f"offset must have shape ({d_ff},), got {tuple(offset.shape)}")


def _hidden(x, w1, b1, act_code, wg=None, bg=None, offset=None):
    """Dense hidden activations in torch: act(x w1^T + b1), or act(x wg^T + bg) * (x w1^T + b1) (GLU),
    minus ``offset``."""
    z = F.linear(x, w1, b1)
    h = ACT_FUNCTIONS[act_code](z) if wg is None else ACT_FUNCTIONS[act_code](F.linear(x, wg, bg)) * z
    return h if offset is None else h - offset


def _use_numba(*tensors) -> bool:
    return NUMBA and all(t is None or t.device.type == "cpu" for t in tensors)


def _opt(t, n):
    return weight_view(t) if t is not None else np.zeros(n, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- gates
def lowrank_gate_indices(x, A, B, c, threshold):
    """Active neurons per token from a rank-r gate: logit[m, j] = (x[m] @ A) @ B[:, j] + c[j] > threshold[j].

    x (M, d), A (d, r), B (r, d_ff), c (d_ff,) or None, threshold scalar or (d_ff,).
    Returns CSR lists (indptr int64 (M+1,), indices int32 (nnz,)), indices ascending per token.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
        raise ValueError(f"A must be (d, r) and B (r, d_ff), got {tuple(A.shape)} and {tuple(B.shape)}")
    _check_x(x, A.shape[0], "A (d, r)")
    d_ff = B.shape[1]
    thr = _thresholds(threshold, d_ff)
    if c is not None and c.shape != (d_ff,):
        raise ValueError(f"c must have shape ({d_ff},), got {tuple(c.shape)}")
    with torch.no_grad():
        u = x.float() @ A.float()  # (M, r): the cheap half, dense BLAS
        if not _use_numba(x, A, B):
            logits = u @ B.float() + (c.float() if c is not None else 0.0)
            return _csr_from_mask(logits > thr.to(logits.device))
        sync_threads()
        m = u.shape[0]
        counts = np.empty(m, dtype=np.int64)
        scratch = np.empty((m, d_ff), dtype=np.int32)
        _lowrank_scan(as_f32(u), as_f32(B), _opt(c, d_ff), thr.numpy(), scratch, counts)
        return _compact(scratch, counts)


def grouped_gate_indices(x, G, c, threshold, group_size):
    """Active neurons per token from a grouped gate: one logit per block of ``group_size`` consecutive neurons.

    x (M, d), G (d, n_groups), c (n_groups,) or None, threshold scalar or (n_groups,). Group g is on
    when x[m] @ G[:, g] + c[g] > threshold[g]; it expands to neurons g*group_size ... (g+1)*group_size-1.
    Returns CSR lists (indptr int64 (M+1,), indices int32 (nnz,)).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    with torch.no_grad():
        logits, thr = grouped_gate_logits(x, G, c, threshold)  # (M, d_ff / group_size): small, dense BLAS
        n_groups = G.shape[1]
        if not _use_numba(x, G):
            on = logits > thr.to(logits.device)
            return _csr_from_mask(on.repeat_interleave(group_size, dim=1))
        sync_threads()
        m = logits.shape[0]
        counts = np.empty(m, dtype=np.int64)
        scratch = np.empty((m, n_groups * group_size), dtype=np.int32)
        _grouped_scan(as_f32(logits), thr.numpy(), group_size, scratch, counts)
        return _compact(scratch, counts)


def grouped_gate_logits(x, G, c, threshold):
    """Checked inputs of a grouped gate -> (logits x @ G + c (M, n_groups) float32, thresholds (n_groups,))."""
    if G.dim() != 2:
        raise ValueError(f"G must be (d, n_groups), got {tuple(G.shape)}")
    _check_x(x, G.shape[0], "G (d, n_groups)")
    n_groups = G.shape[1]
    thr = _thresholds(threshold, n_groups)
    if c is not None and c.shape != (n_groups,):
        raise ValueError(f"c must have shape ({n_groups},), got {tuple(c.shape)}")
    with torch.no_grad():
        logits = x.float() @ G.float()
        if c is not None:
            logits += c.float()
    return logits, thr


def _csr_from_mask(mask: torch.Tensor):
    """Reference/fallback conversion of a dense (M, d_ff) bool mask to CSR lists."""
    counts = mask.sum(1)
    indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    indptr[1:] = torch.cumsum(counts, 0)
    indices = mask.nonzero()[:, 1].to(torch.int32)
    return indptr, indices


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


# ---------------------------------------------------------------------------------------------- MLPs
def sparse_mlp(x, w1, b1, w2_t, b2, indptr, indices, act_code, wg=None, bg=None, offset=None):
    """Per-token sparse MLP: y[m] = b2 + sum_{j in list m} act(w1[j] . x[m] + b1[j]) * w2_t[j].

    x (M, d), w1 (d_ff, d) (nn.Linear weight), b1 (d_ff,) or None, w2_t (d_ff, d_out) (fc2.weight.T,
    contiguous), b2 (d_out,) or None, CSR lists from a gate. With ``wg`` (d_ff, d) and ``bg`` (GLU) the
    neuron's value is act(wg[j] . x[m] + bg[j]) * (w1[j] . x[m] + b1[j]); ``offset[j]`` is subtracted from
    it. Returns (M, d_out) in x's dtype.
    """
    _check_mlp(x, w1, b1, w2_t, b2)
    _check_glu(w1, wg, bg)
    _check_offset(offset, w1.shape[0])
    _check_csr(indptr, indices, x.shape[0], w1.shape[0])
    _check_act(act_code)
    with torch.no_grad():
        if not _use_numba(x, w1, w2_t, wg):
            return sparse_mlp_torch(x, w1, b1, w2_t, b2, indptr, indices, act_code, wg, bg, offset)
        sync_threads()
        d_ff, d_out = w2_t.shape
        y = np.empty((x.shape[0], d_out), dtype=np.float32)
        glu = wg is not None
        w1_view = weight_view(w1)
        args = (as_f32(x), weight_view(wg) if glu else w1_view, _opt(bg, d_ff), glu, w1_view, _opt(b1, d_ff),
                _opt(offset, d_ff), weight_view(w2_t), _opt(b2, d_out), indptr.numpy(), indices.numpy())
        threads = numba.get_num_threads()
        if indices.numel() * (x.shape[1] * (1 + glu) + d_out) < PARALLEL_MIN_WORK or threads == 1:
            _sparse_mlp_serial(*args, act_code, y)
        elif x.shape[0] < threads:
            _sparse_mlp_split(*args, act_code, y, np.empty((threads, d_out), dtype=np.float32))
        else:
            _sparse_mlp(*args, act_code, y)
        return torch.from_numpy(y).to(x.dtype)


def sparse_mlp_torch(x, w1, b1, w2_t, b2, indptr, indices, act_code, wg=None, bg=None, offset=None):
    """Pure-torch sparse_mlp (fallback and reference): gather the (token, neuron) pairs, scatter-add back."""
    m = x.shape[0]
    xf = x.float()
    rows = torch.repeat_interleave(torch.arange(m, device=x.device), indptr[1:] - indptr[:-1])
    cols = indices.long()

    def pre_activation(w, b):
        z = (w.float()[cols] * xf[rows]).sum(-1)
        return z if b is None else z + b.float()[cols]

    h = ACT_FUNCTIONS[act_code](pre_activation(w1, b1) if wg is None else pre_activation(wg, bg))
    if wg is not None:
        h = h * pre_activation(w1, b1)
    if offset is not None:
        h = h - offset.float()[cols]
    y = torch.zeros(m, w2_t.shape[1], dtype=torch.float32, device=x.device)
    y.index_add_(0, rows, h.unsqueeze(1) * w2_t.float()[cols])
    if b2 is not None:
        y += b2.float()
    return y.to(x.dtype)


def union_sparse_mlp(x, w1, b1, w2_t, b2, indptr, indices, act_code, wg=None, bg=None, offset=None):
    """The same result as ``sparse_mlp`` via the batch's union of active neurons: gather those rows once,
    run dense matmuls over them, and zero each token's neurons outside its own list. Wins when the
    tokens' sets overlap a lot (small batches, shared hot neurons)."""
    _check_mlp(x, w1, b1, w2_t, b2)
    _check_glu(w1, wg, bg)
    _check_offset(offset, w1.shape[0])
    _check_csr(indptr, indices, x.shape[0], w1.shape[0])
    _check_act(act_code)
    with torch.no_grad():
        union, mask = _union_and_mask(indptr, indices, w1.shape[0], x.device)

        def rows(t):
            return None if t is None else t.float()[union]

        h = _hidden(x.float(), rows(w1), rows(b1), act_code, rows(wg), rows(bg), rows(offset)) * mask
        y = h @ w2_t.float()[union]
        if b2 is not None:
            y += b2.float()
        return y.to(x.dtype)


def _union_and_mask(indptr, indices, d_ff: int, device):
    """The batch's union of listed neurons (ascending) and each token's 0/1 mask over it, (M, |union|).
    One pass over the lists in numba; torch (unique + scatter) where numba is missing."""
    m = indptr.numel() - 1
    if _use_numba(indptr, indices):
        present = np.zeros(d_ff, dtype=np.int64)
        union_size = _mark_union(indices.numpy(), present)
        union = np.empty(union_size, dtype=np.int64)
        mask = np.zeros((m, union_size), dtype=np.float32)
        _fill_union_mask(indptr.numpy(), indices.numpy(), present, union, mask)
        return torch.from_numpy(union), torch.from_numpy(mask)
    cols = indices.long()
    union, local = torch.unique(cols, return_inverse=True)
    rows = torch.repeat_interleave(torch.arange(m, device=device), indptr[1:] - indptr[:-1])
    mask = torch.zeros(m, union.numel(), dtype=torch.float32, device=device)
    mask[rows, local] = 1.0
    return union, mask


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


def relu_skip_mlp(x, w1, b1, w2_t, b2):
    """Exact ReLU MLP that skips zeros: dense fc1 + ReLU (BLAS), then fc2 only over each token's non-zeros.

    The strongest honest baseline for activation sparsity: no gate, no accuracy loss.
    """
    _check_mlp(x, w1, b1, w2_t, b2)
    with torch.no_grad():
        h = F.relu(F.linear(x.float(), w1.float(), None if b1 is None else b1.float()))
        if not _use_numba(x, w1, w2_t):
            y = h @ w2_t.float()
            if b2 is not None:
                y += b2.float()
            return y.to(x.dtype)
        sync_threads()
        d_out = w2_t.shape[1]
        y = np.empty((x.shape[0], d_out), dtype=np.float32)
        _skip_fc2(as_f32(h), weight_view(w2_t), _opt(b2, d_out), y)
        return torch.from_numpy(y).to(x.dtype)


def gated_sparse_mlp(x, w1, b1, w2_t, b2, indptr, indices, act_code, wg=None, bg=None, offset=None):
    """Sparse MLP with the execution picked by measured sizes: union (dense BLAS over the union of
    active neurons) when M * |union| < UNION_SPEEDUP * nnz, else per-token."""
    _check_csr(indptr, indices, x.shape[0], w1.shape[0])
    path = choose_path(x.shape[0], indices, w1.shape[0])
    return path(x, w1, b1, w2_t, b2, indptr, indices, act_code, wg, bg, offset)


def choose_path(m: int, indices: torch.Tensor, d_ff: int):
    """The kernel ``gated_sparse_mlp`` will run for these lists (exposed for tests and benchmarks)."""
    nnz = indices.numel()
    if not NUMBA:
        return union_sparse_mlp
    if nnz == 0 or m < UNION_MIN_TOKENS:
        return sparse_mlp
    union = int(torch.bincount(indices.long(), minlength=d_ff).count_nonzero())
    return union_sparse_mlp if m * union < UNION_SPEEDUP * nnz else sparse_mlp


def _check_act(act_code) -> None:
    if act_code not in ACT_FUNCTIONS:
        raise ValueError(f"act_code must be one of {sorted(ACT_FUNCTIONS)} (gelu, relu, silu, tanh, identity), got {act_code!r}")


if NUMBA:

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
