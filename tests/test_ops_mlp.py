"""The sparse MLP op (per-token and union forms) and the ReLU skip against plain dense torch references
(fp32, 1e-4 relative)."""
import pytest
import torch
import torch.nn.functional as F

from dynsparse import activations
from dynsparse.ops import backend as backend_mod
from dynsparse.ops.gates import lowrank_gate_indices
from dynsparse.ops.mlp import (
    UNION_MIN_TOKENS,
    MLPWeights,
    choose_strategy,
    numba_impl,
    relu_skip_mlp,
    sparse_mlp,
    sparse_mlp_op,
)
from dynsparse.ops.mlp.csr import csr_from_mask

ACTS = {0: F.gelu, 1: F.relu, 2: F.silu, 3: torch.tanh, 4: lambda z: z}
# the four execution paths of the old kernels: numba per-token, torch per-token, numba union, the dispatcher
PATHS = [("numba", "token"), ("torch", "token"), ("numba", "union"), ("numba", "auto")]


def _mlp(m=37, d=24, d_ff=96, d_out=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    w1 = torch.randn(d_ff, d, generator=g) / d**0.5
    b1 = torch.randn(d_ff, generator=g) * 0.1
    w2 = torch.randn(d_out, d_ff, generator=g) / d_ff**0.5
    b2 = torch.randn(d_out, generator=g) * 0.1
    return x, w1, b1, w2, b2


def _run(x, w1, b1, w2_t, b2, indptr, indices, act_code, backend="numba", strategy="auto"):
    return sparse_mlp(x, MLPWeights(w1, b1, w2_t, b2), indptr, indices, activation=activations.by_code(act_code).name,
                      strategy=strategy, backend=backend)


def _mask_from_csr(indptr, indices, m, d_ff):
    mask = torch.zeros(m, d_ff, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(m), indptr[1:] - indptr[:-1])
    mask[rows, indices.long()] = True
    return mask


def _random_csr(m, d_ff, density, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, d_ff, generator=g) < density
    return mask, csr_from_mask(mask)


def _reference(x, w1, b1, w2, b2, mask, act_code):
    z = F.linear(x, w1, b1)
    return F.linear(ACTS[act_code](z) * mask, w2, b2)


def _close(a, b):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() / scale < 1e-4, float((a - b).abs().max() / scale)


def test_kernel_activation_codes_match_the_registry():
    from dynsparse.ops._numba import act

    assert {name: activations.code(name) for name in activations.NAMES} == {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3, "identity": 4}
    z = torch.linspace(-3, 3, 11)
    for name in activations.NAMES:
        want = activations.fn(name)(z)
        got = torch.tensor([act(float(v), activations.code(name)) for v in z])
        assert torch.allclose(got, want, atol=1e-6), name


@pytest.mark.parametrize("act_code", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 3, 37])
@pytest.mark.parametrize("min_work", [0, 1 << 62])  # threaded (split for m < threads) and serial kernels
def test_sparse_mlp_matches_masked_dense(act_code, m, min_work, monkeypatch):
    monkeypatch.setattr(numba_impl, "PARALLEL_MIN_WORK", min_work)
    x, w1, b1, w2, b2 = _mlp(m=m)
    mask, (indptr, indices) = _random_csr(m, w1.shape[0], 0.2)
    want = _reference(x, w1, b1, w2, b2, mask, act_code)
    w2_t = w2.t().contiguous()
    for backend, strategy in PATHS:
        _close(_run(x, w1, b1, w2_t, b2, indptr, indices, act_code, backend, strategy), want)


def test_sparse_mlp_without_biases_and_empty_lists():
    x, w1, _, w2, _ = _mlp(m=9)
    mask, (indptr, indices) = _random_csr(9, w1.shape[0], 0.3)
    mask[4] = False
    indptr, indices = csr_from_mask(mask)
    w2_t = w2.t().contiguous()
    want = _reference(x, w1, None, w2, None, mask, 0)
    for strategy in ("token", "union"):
        y = _run(x, w1, None, w2_t, None, indptr, indices, 0, strategy=strategy)
        _close(y, want)
        assert torch.all(y[4] == 0)
    empty = torch.zeros(0, dtype=torch.int32)
    zero_ptr = torch.zeros(10, dtype=torch.int64)
    assert torch.all(_run(x, w1, None, w2_t, None, zero_ptr, empty, 0, strategy="token") == 0)


def test_gate_then_mlp_end_to_end_bf16_output_dtype():
    x, w1, b1, w2, b2 = _mlp(m=16, d=32, d_ff=64)
    A, B = torch.randn(32, 4), torch.randn(4, 64)
    indptr, indices = lowrank_gate_indices(x.bfloat16(), A, B, None, 0.5)
    y = _run(x.bfloat16(), w1, b1, w2.t().contiguous(), b2, indptr, indices, 1, strategy="token")
    assert y.dtype == torch.bfloat16 and y.shape == (16, 20)


def test_relu_skip_is_the_dense_relu_mlp():
    x, w1, b1, w2, b2 = _mlp(m=29)
    b1 = b1 - 0.5  # sparser ReLU output, as in the benchmark
    want = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    _close(relu_skip_mlp(x, MLPWeights(w1, b1, w2.t().contiguous(), b2)), want)
    _close(relu_skip_mlp(x, MLPWeights(w1, None, w2.t().contiguous(), None)), F.linear(F.relu(F.linear(x, w1)), w2))


def test_dispatcher_picks_union_for_shared_sets_and_per_token_for_scattered():
    m, d_ff = UNION_MIN_TOKENS, 512
    shared = torch.zeros(m, d_ff, dtype=torch.bool)
    shared[:, :40] = True
    _, idx = csr_from_mask(shared)
    assert choose_strategy(m, idx, d_ff, "numba") == "union"
    _, (_, idx) = _random_csr(m, d_ff, 0.1)
    assert choose_strategy(m, idx, d_ff, "numba") == "token"
    _, idx = csr_from_mask(shared[: m - 1])  # below the minimum batch the union's fixed costs dominate
    assert choose_strategy(m - 1, idx, d_ff, "numba") == "token"


def test_bad_inputs_name_the_problem():
    x, w1, b1, w2, b2 = _mlp(m=4)
    _, (indptr, indices) = _random_csr(4, w1.shape[0], 0.2)
    w2_t = w2.t().contiguous()
    with pytest.raises(ValueError, match="x must have shape"):
        _run(x[:, :5], w1, b1, w2_t, b2, indptr, indices, 0)
    with pytest.raises(ValueError, match="indices must be a 1-D int32"):
        _run(x, w1, b1, w2_t, b2, indptr, indices.long(), 0)
    with pytest.raises(ValueError, match="indptr"):
        _run(x, w1, b1, w2_t, b2, indptr[:-1], indices, 0)
    with pytest.raises(ValueError, match="indices must lie"):
        _run(x, w1, b1, w2_t, b2, indptr, indices + 1000, 0)
    with pytest.raises(ValueError, match="act_code"):
        sparse_mlp_op(x, w1, b1, w2_t, b2, None, None, None, indptr, indices, "auto", 0, 9, "numba")
    with pytest.raises(ValueError, match="w1 must be"):
        _run(x, w1, b1, w2, b2, indptr, indices, 0)
    with pytest.raises(ValueError, match="threshold"):
        lowrank_gate_indices(x, torch.randn(24, 3), torch.randn(3, 96), None, torch.zeros(5))
    from dynsparse.ops.gates import grouped_gate_indices

    with pytest.raises(ValueError, match="group_size"):
        grouped_gate_indices(x, torch.randn(24, 3), None, 0.0, 0)
    with pytest.raises(TypeError, match="floating"):
        lowrank_gate_indices(x.long(), torch.randn(24, 3), torch.randn(3, 96), None, 0.0)


def test_torch_fallbacks_without_numba(monkeypatch):
    monkeypatch.setattr(backend_mod, "numba_available", lambda: False)  # "auto" then resolves to torch
    x, w1, b1, w2, b2 = _mlp(m=11)
    A, B = torch.randn(24, 5), torch.randn(5, 96)
    indptr, indices = lowrank_gate_indices(x, A, B, None, 1.0)
    mask = _mask_from_csr(indptr, indices, 11, 96)
    assert torch.equal(mask, (x @ A) @ B > 1.0)
    w2_t = w2.t().contiguous()
    _close(_run(x, w1, b1, w2_t, b2, indptr, indices, 0, "auto", "token"), _reference(x, w1, b1, w2, b2, mask, 0))
    _close(_run(x, w1, b1, w2_t, b2, indptr, indices, 0, "auto"), _reference(x, w1, b1, w2, b2, mask, 0))
    _close(relu_skip_mlp(x, MLPWeights(w1, b1, w2_t, b2)), F.linear(F.relu(F.linear(x, w1, b1)), w2, b2))
    from dynsparse.ops.gates import grouped_gate_indices

    ip, ix = grouped_gate_indices(x, torch.randn(24, 12), None, 0.0, 8)
    assert ip.shape == (12,) and ix.dtype == torch.int32
