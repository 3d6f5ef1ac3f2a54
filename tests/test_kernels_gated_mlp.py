"""Gated sparse MLP kernels against plain dense torch references (fp32, 1e-4 relative)."""
import pytest
import torch
import torch.nn.functional as F

from dynsparse.kernels import gated_mlp as gm
from dynsparse.tree.activations import ACTIVATION_CODES

ACTS = {0: F.gelu, 1: F.relu, 2: F.silu, 3: torch.tanh, 4: lambda z: z}


def _mlp(m=37, d=24, d_ff=96, d_out=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    w1 = torch.randn(d_ff, d, generator=g) / d**0.5
    b1 = torch.randn(d_ff, generator=g) * 0.1
    w2 = torch.randn(d_out, d_ff, generator=g) / d_ff**0.5
    b2 = torch.randn(d_out, generator=g) * 0.1
    return x, w1, b1, w2, b2


def _mask_from_csr(indptr, indices, m, d_ff):
    mask = torch.zeros(m, d_ff, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(m), indptr[1:] - indptr[:-1])
    mask[rows, indices.long()] = True
    return mask


def _random_csr(m, d_ff, density, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, d_ff, generator=g) < density
    return mask, gm._csr_from_mask(mask)


def _reference(x, w1, b1, w2, b2, mask, act_code):
    z = F.linear(x, w1, b1)
    return F.linear(ACTS[act_code](z) * mask, w2, b2)


def _close(a, b):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() / scale < 1e-4, float((a - b).abs().max() / scale)


def test_activation_codes_match_tree_layer():
    assert {name: code for name, code in ACTIVATION_CODES.items()} == {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3, "identity": 4}
    for name, code in ACTIVATION_CODES.items():
        z = torch.linspace(-3, 3, 11)
        from dynsparse.tree.activations import get_activation

        assert torch.allclose(gm.ACT_FUNCTIONS[code](z), get_activation(name)(z))


@pytest.mark.parametrize("per_neuron", [False, True])
def test_lowrank_gate_matches_dense_logits(per_neuron):
    g = torch.Generator().manual_seed(3)
    m, d, r, d_ff = 53, 32, 6, 1100  # d_ff not a multiple of the kernel's tile
    x, A, B, c = torch.randn(m, d, generator=g), torch.randn(d, r, generator=g), torch.randn(r, d_ff, generator=g), torch.randn(d_ff, generator=g)
    thr = torch.randn(d_ff, generator=g) * 2 + 3 if per_neuron else 4.0
    indptr, indices = gm.lowrank_gate_indices(x, A, B, c, thr)
    assert indptr.dtype == torch.int64 and indices.dtype == torch.int32 and indptr.shape == (m + 1,)
    logits = (x @ A) @ B + c
    t = torch.as_tensor(thr).expand(d_ff)
    got = _mask_from_csr(indptr, indices, m, d_ff)
    decided = (logits - t).abs() > 1e-4  # ties within rounding may go either way
    assert decided.float().mean() > 0.99
    assert torch.equal(got[decided], (logits > t)[decided])
    assert 0.05 < got.float().mean() < 0.95
    # indices ascend within each token (the kernels rely on nothing else, users may)
    for i in range(m):
        row = indices[indptr[i] : indptr[i + 1]]
        assert torch.all(row[1:] > row[:-1])


def test_grouped_gate_expands_groups():
    g = torch.Generator().manual_seed(4)
    m, d, n_groups, gs = 41, 16, 12, 8
    x, G, c = torch.randn(m, d, generator=g), torch.randn(d, n_groups, generator=g), torch.randn(n_groups, generator=g)
    indptr, indices = gm.grouped_gate_indices(x, G, c, 1.0, gs)
    logits = x @ G + c
    want = (logits > 1.0).repeat_interleave(gs, dim=1)
    got = _mask_from_csr(indptr, indices, m, n_groups * gs)
    decided = ((logits - 1.0).abs() > 1e-4).repeat_interleave(gs, dim=1)
    assert torch.equal(got[decided], want[decided])
    assert 0.05 < got.float().mean() < 0.95


@pytest.mark.parametrize("act_code", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 3, 37])
@pytest.mark.parametrize("min_work", [0, 1 << 62])  # threaded (split for m < threads) and serial kernels
def test_sparse_mlp_matches_masked_dense(act_code, m, min_work, monkeypatch):
    monkeypatch.setattr(gm, "PARALLEL_MIN_WORK", min_work)
    x, w1, b1, w2, b2 = _mlp(m=m)
    mask, (indptr, indices) = _random_csr(m, w1.shape[0], 0.2)
    want = _reference(x, w1, b1, w2, b2, mask, act_code)
    w2_t = w2.t().contiguous()
    for fn in (gm.sparse_mlp, gm.sparse_mlp_torch, gm.union_sparse_mlp, gm.gated_sparse_mlp):
        _close(fn(x, w1, b1, w2_t, b2, indptr, indices, act_code), want)


def test_sparse_mlp_without_biases_and_empty_lists():
    x, w1, _, w2, _ = _mlp(m=9)
    mask, (indptr, indices) = _random_csr(9, w1.shape[0], 0.3)
    mask[4] = False
    indptr, indices = gm._csr_from_mask(mask)
    w2_t = w2.t().contiguous()
    want = _reference(x, w1, None, w2, None, mask, 0)
    for fn in (gm.sparse_mlp, gm.union_sparse_mlp):
        y = fn(x, w1, None, w2_t, None, indptr, indices, 0)
        _close(y, want)
        assert torch.all(y[4] == 0)
    empty = torch.zeros(0, dtype=torch.int32)
    zero_ptr = torch.zeros(10, dtype=torch.int64)
    assert torch.all(gm.sparse_mlp(x, w1, None, w2_t, None, zero_ptr, empty, 0) == 0)


def test_gate_then_mlp_end_to_end_bf16_output_dtype():
    x, w1, b1, w2, b2 = _mlp(m=16, d=32, d_ff=64)
    A, B = torch.randn(32, 4), torch.randn(4, 64)
    indptr, indices = gm.lowrank_gate_indices(x.bfloat16(), A, B, None, 0.5)
    y = gm.sparse_mlp(x.bfloat16(), w1, b1, w2.t().contiguous(), b2, indptr, indices, 1)
    assert y.dtype == torch.bfloat16 and y.shape == (16, 20)


def test_relu_skip_is_the_dense_relu_mlp():
    x, w1, b1, w2, b2 = _mlp(m=29)
    b1 = b1 - 0.5  # sparser ReLU output, as in the benchmark
    want = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    _close(gm.relu_skip_mlp(x, w1, b1, w2.t().contiguous(), b2), want)
    _close(gm.relu_skip_mlp(x, w1, None, w2.t().contiguous(), None), F.linear(F.relu(F.linear(x, w1)), w2))


def test_dispatcher_picks_union_for_shared_sets_and_per_token_for_scattered():
    m, d_ff = gm.UNION_MIN_TOKENS, 512
    shared = torch.zeros(m, d_ff, dtype=torch.bool)
    shared[:, :40] = True
    _, idx = gm._csr_from_mask(shared)
    assert gm.choose_path(m, idx, d_ff) is gm.union_sparse_mlp
    _, (_, idx) = _random_csr(m, d_ff, 0.1)
    assert gm.choose_path(m, idx, d_ff) is gm.sparse_mlp
    _, idx = gm._csr_from_mask(shared[: m - 1])  # below the minimum batch the union's fixed costs dominate
    assert gm.choose_path(m - 1, idx, d_ff) is gm.sparse_mlp


def test_bad_inputs_name_the_problem():
    x, w1, b1, w2, b2 = _mlp(m=4)
    _, (indptr, indices) = _random_csr(4, w1.shape[0], 0.2)
    w2_t = w2.t().contiguous()
    with pytest.raises(ValueError, match="x must have shape"):
        gm.sparse_mlp(x[:, :5], w1, b1, w2_t, b2, indptr, indices, 0)
    with pytest.raises(ValueError, match="indices must be a 1-D int32"):
        gm.sparse_mlp(x, w1, b1, w2_t, b2, indptr, indices.long(), 0)
    with pytest.raises(ValueError, match="indptr"):
        gm.sparse_mlp(x, w1, b1, w2_t, b2, indptr[:-1], indices, 0)
    with pytest.raises(ValueError, match="indices must lie"):
        gm.sparse_mlp(x, w1, b1, w2_t, b2, indptr, indices + 1000, 0)
    with pytest.raises(ValueError, match="act_code"):
        gm.sparse_mlp(x, w1, b1, w2_t, b2, indptr, indices, 9)
    with pytest.raises(ValueError, match="w1 must be"):
        gm.sparse_mlp(x, w1, b1, w2, b2, indptr, indices, 0)
    with pytest.raises(ValueError, match="threshold"):
        gm.lowrank_gate_indices(x, torch.randn(24, 3), torch.randn(3, 96), None, torch.zeros(5))
    with pytest.raises(ValueError, match="group_size"):
        gm.grouped_gate_indices(x, torch.randn(24, 3), None, 0.0, 0)
    with pytest.raises(TypeError, match="floating"):
        gm.lowrank_gate_indices(x.long(), torch.randn(24, 3), torch.randn(3, 96), None, 0.0)


def test_torch_fallbacks_without_numba(monkeypatch):
    monkeypatch.setattr(gm, "NUMBA", False)
    x, w1, b1, w2, b2 = _mlp(m=11)
    A, B = torch.randn(24, 5), torch.randn(5, 96)
    indptr, indices = gm.lowrank_gate_indices(x, A, B, None, 1.0)
    mask = _mask_from_csr(indptr, indices, 11, 96)
    assert torch.equal(mask, (x @ A) @ B > 1.0)
    w2_t = w2.t().contiguous()
    _close(gm.sparse_mlp(x, w1, b1, w2_t, b2, indptr, indices, 0), _reference(x, w1, b1, w2, b2, mask, 0))
    _close(gm.gated_sparse_mlp(x, w1, b1, w2_t, b2, indptr, indices, 0), _reference(x, w1, b1, w2, b2, mask, 0))
    _close(gm.relu_skip_mlp(x, w1, b1, w2_t, b2), F.linear(F.relu(F.linear(x, w1, b1)), w2, b2))
    ip, ix = gm.grouped_gate_indices(x, torch.randn(24, 12), None, 0.0, 8)
    assert ip.shape == (12,) and ix.dtype == torch.int32
