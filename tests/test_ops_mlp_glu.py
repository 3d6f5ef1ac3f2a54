"""Gated (GLU, Llama-style) MLPs and hidden-value offsets (MGS compensation) through every sparse MLP
path, against a dense masked torch reference: y = fc2((act(x wg^T + bg) * (x w1^T + b1) - offset) * mask)."""
import pytest
import torch
import torch.nn.functional as F

from dynsparse import activations
from dynsparse.ops.gates import grouped_gate_groups
from dynsparse.ops.mlp import MLPWeights, numba_grouped, numba_impl, sparse_mlp
from dynsparse.ops.mlp.csr import csr_from_mask

ACTS = {0: F.gelu, 1: F.relu, 2: F.silu, 3: torch.tanh, 4: lambda z: z}
# the four execution paths of the old kernels: numba per-token, torch per-token, numba union, the dispatcher
PATHS = [("numba", "token"), ("torch", "token"), ("numba", "union"), ("numba", "auto")]


def _run(x, w1, b1, w2_t, b2, indptr, indices, act_code, wg=None, bg=None, offset=None, backend="numba",
         strategy="auto", group_size=0):
    return sparse_mlp(x, MLPWeights(w1, b1, w2_t, b2, wg, bg, offset), indptr, indices,
                      activation=activations.by_code(act_code).name, strategy=strategy, group_size=group_size,
                      backend=backend)


def _glu(m, d=24, d_ff=96, d_out=20, seed=0, biases=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    wg, w1 = torch.randn(d_ff, d, generator=g) / d**0.5, torch.randn(d_ff, d, generator=g) / d**0.5
    w2 = torch.randn(d_out, d_ff, generator=g) / d_ff**0.5
    bg, b1, b2 = (torch.randn(n, generator=g) * 0.1 if biases else None for n in (d_ff, d_ff, d_out))
    return x, wg, bg, w1, b1, w2, b2


def _reference(x, wg, bg, w1, b1, w2, b2, mask, act_code, offset=None):
    h = F.linear(x, w1, b1) if wg is None else ACTS[act_code](F.linear(x, wg, bg)) * F.linear(x, w1, b1)
    if wg is None:
        h = ACTS[act_code](h)
    return F.linear((h - (0 if offset is None else offset)) * mask, w2, b2)


def _close(a, b):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() / scale < 1e-4, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("m", [1, 3, 37, 200])
@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("work_limit", [0, 1 << 62])  # threaded (split or prange) / serial
def test_per_token_and_union_paths(m, biases, work_limit, monkeypatch):
    monkeypatch.setattr(numba_impl, "PARALLEL_MIN_WORK", work_limit)
    for act_code in range(5):
        x, wg, bg, w1, b1, w2, b2 = _glu(m, seed=act_code, biases=biases)
        mask = torch.rand(m, w1.shape[0], generator=torch.Generator().manual_seed(act_code)) < 0.3
        indptr, indices = csr_from_mask(mask)
        ref = _reference(x, wg, bg, w1, b1, w2, b2, mask, act_code)
        w2_t = w2.t().contiguous()
        for backend, strategy in PATHS:
            _close(_run(x, w1, b1, w2_t, b2, indptr, indices, act_code, wg, bg, backend=backend, strategy=strategy), ref)


@pytest.mark.parametrize("m,group_size", [(1, 4), (9, 16), (130, 8)])
@pytest.mark.parametrize("work_limit", [0, 1 << 62])
def test_grouped_path(m, group_size, work_limit, monkeypatch):
    monkeypatch.setattr(numba_grouped, "PARALLEL_MIN_WORK", work_limit)
    for act_code in range(5):
        x, wg, bg, w1, b1, w2, b2 = _glu(m, seed=10 + act_code)
        G = torch.randn(x.shape[1], w1.shape[0] // group_size, generator=torch.Generator().manual_seed(act_code))
        indptr, groups = grouped_gate_groups(x, G, None, 0.5)
        mask = (x @ G > 0.5).repeat_interleave(group_size, dim=1)
        y = _run(x, w1, b1, w2.t().contiguous(), b2, indptr, groups, act_code, wg, bg, strategy="grouped",
                 group_size=group_size)
        _close(y, _reference(x, wg, bg, w1, b1, w2, b2, mask, act_code))


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("work_limit", [0, 1 << 62])
def test_offsets_in_every_path(glu, work_limit, monkeypatch):
    monkeypatch.setattr(numba_impl, "PARALLEL_MIN_WORK", work_limit)
    monkeypatch.setattr(numba_grouped, "PARALLEL_MIN_WORK", work_limit)
    for m in (1, 37, 200):
        x, wg, bg, w1, b1, w2, b2 = _glu(m, seed=m)
        wg, bg = (wg, bg) if glu else (None, None)
        offset = torch.randn(w1.shape[0], generator=torch.Generator().manual_seed(m)) * 0.3
        mask = torch.rand(m, w1.shape[0], generator=torch.Generator().manual_seed(m + 1)) < 0.3
        indptr, indices = csr_from_mask(mask)
        w2_t = w2.t().contiguous()
        ref = _reference(x, wg, bg, w1, b1, w2, b2, mask, 0, offset)
        for backend, strategy in PATHS:
            _close(_run(x, w1, b1, w2_t, b2, indptr, indices, 0, wg, bg, offset, backend, strategy), ref)
        G = torch.randn(x.shape[1], w1.shape[0] // 8, generator=torch.Generator().manual_seed(m))
        gptr, groups = grouped_gate_groups(x, G, None, 0.5)
        gmask = (x @ G > 0.5).repeat_interleave(8, dim=1)
        y = _run(x, w1, b1, w2_t, b2, gptr, groups, 0, wg, bg, offset, strategy="grouped", group_size=8)
        _close(y, _reference(x, wg, bg, w1, b1, w2, b2, gmask, 0, offset))


def test_bad_gate_projection_is_named():
    x, wg, bg, w1, b1, w2, b2 = _glu(4)
    indptr, indices = csr_from_mask(torch.ones(4, w1.shape[0], dtype=torch.bool))
    w2_t = w2.t().contiguous()
    with pytest.raises(ValueError, match="wg"):
        _run(x, w1, b1, w2_t, b2, indptr, indices, 2, wg[:-1], bg)
    with pytest.raises(ValueError, match="bg"):
        _run(x, w1, b1, w2_t, b2, indptr, indices, 2, wg, bg[:-1])
    with pytest.raises(ValueError, match="without wg"):
        _run(x, w1, b1, w2_t, b2, indptr, indices, 2, None, bg, strategy="union")
    with pytest.raises(ValueError, match="offset"):
        _run(x, w1, b1, w2_t, b2, indptr, indices, 2, offset=torch.zeros(3))
