"""The sparse MLP op's grouped strategy (group lists, run group by group) against a dense masked torch reference (fp32, 1e-4 relative)."""
import pytest
import torch
import torch.nn.functional as F

from dynsparse import activations
from dynsparse.ops.gates import grouped_gate_groups
from dynsparse.ops.mlp import MLPWeights, numba_grouped, sparse_mlp
from dynsparse.ops.mlp.csr import expand_groups

ACTS = {0: F.gelu, 1: F.relu, 2: F.silu, 3: torch.tanh, 4: lambda z: z}


def _grouped(x, w1, b1, w2_t, b2, indptr, groups, group_size, act_code, backend="numba"):
    return sparse_mlp(x, MLPWeights(w1, b1, w2_t, b2), indptr, groups, activation=activations.by_code(act_code).name,
                      strategy="grouped", group_size=group_size, backend=backend)


def _case(m, d, d_ff, d_out, n_groups, density, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    w1 = torch.randn(d_ff, d, generator=g) / d**0.5
    b1 = torch.randn(d_ff, generator=g) * 0.1
    w2 = torch.randn(d_out, d_ff, generator=g) / d_ff**0.5
    b2 = torch.randn(d_out, generator=g) * 0.1
    G = torch.randn(d, n_groups, generator=g)
    thr = torch.quantile(x @ G, 1 - density, dim=0) if m > 1 else torch.full((n_groups,), 0.5)
    return x, w1, b1, w2, b2, G, thr


def _reference(x, w1, b1, w2, b2, G, thr, group_size, act_code):
    on = (x @ G > thr).repeat_interleave(group_size, dim=1)
    return F.linear(ACTS[act_code](F.linear(x, w1, b1)) * on, w2, b2)


def _close(a, b):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() / scale < 1e-4, float((a - b).abs().max() / scale)


@pytest.mark.parametrize(
    "m,d,d_ff,d_out,group_size,density",
    [(1, 24, 96, 20, 4, 0.5), (7, 24, 96, 20, 16, 0.3), (45, 33, 120, 17, 6, 0.2), (130, 32, 256, 32, 16, 0.1),
     (64, 16, 64, 8, 1, 0.4), (9, 16, 64, 8, 64, 0.5)],
)
@pytest.mark.parametrize("threaded", [False, True])
def test_grouped_kernel_matches_masked_reference(m, d, d_ff, d_out, group_size, density, threaded, monkeypatch):
    monkeypatch.setattr(numba_grouped, "PARALLEL_MIN_WORK", 0 if threaded else 1 << 62)
    for act_code in range(5):
        x, w1, b1, w2, b2, G, thr = _case(m, d, d_ff, d_out, d_ff // group_size, density, seed=act_code)
        indptr, groups = grouped_gate_groups(x, G, None, thr)
        y = _grouped(x, w1, b1, w2.t().contiguous(), b2, indptr, groups, group_size, act_code)
        _close(y, _reference(x, w1, b1, w2, b2, G, thr, group_size, act_code))


def test_grouped_kernel_without_biases_and_with_empty_lists():
    x, w1, _, w2, _, G, _ = _case(20, 16, 64, 8, 8, 0.5, seed=9)
    thr = torch.full((8,), float("inf"))
    thr[3] = -float("inf")  # one group on for every token, the rest never
    indptr, groups = grouped_gate_groups(x, G, None, thr)
    assert groups.tolist() == [3] * 20
    y = _grouped(x, w1, None, w2.t().contiguous(), None, indptr, groups, 8, 1)
    _close(y, _reference(x, w1, None, w2, None, G, thr, 8, 1))
    none_ptr = torch.zeros(21, dtype=torch.int64)
    y0 = _grouped(x, w1, None, w2.t().contiguous(), None, none_ptr, torch.zeros(0, dtype=torch.int32), 8, 1)
    assert torch.all(y0 == 0)


def test_gate_lists_match_the_dense_gate_and_expand_to_neurons():
    x, *_, G, thr = _case(30, 16, 64, 8, 16, 0.3, seed=2)
    c = torch.randn(16)
    indptr, groups = grouped_gate_groups(x, G, c, thr)
    on = x @ G + c > thr
    for i in range(30):
        assert groups[indptr[i]:indptr[i + 1]].tolist() == on[i].nonzero()[:, 0].tolist()
    nptr, neurons = expand_groups(indptr, groups, 4)
    for i in range(30):
        assert neurons[nptr[i]:nptr[i + 1]].tolist() == on[i].repeat_interleave(4).nonzero()[:, 0].tolist()


def test_bad_lists_and_shapes_are_named():
    x, w1, b1, w2, b2, G, thr = _case(5, 16, 64, 8, 8, 0.5, seed=3)
    indptr, groups = grouped_gate_groups(x, G, None, thr)
    w2_t = w2.t().contiguous()
    with pytest.raises(ValueError, match="group_size"):
        _grouped(x, w1, b1, w2_t, b2, indptr, groups, 7, 1)
    with pytest.raises(ValueError, match=r"groups must lie in \[0, 8\)"):
        _grouped(x, w1, b1, w2_t, b2, indptr, groups + 8, 8, 1)
    with pytest.raises(ValueError, match="int32"):
        _grouped(x, w1, b1, w2_t, b2, indptr, groups.long(), 8, 1)
    with pytest.raises(ValueError, match="indptr"):
        _grouped(x, w1, b1, w2_t, b2, indptr[:-1], groups, 8, 1)
    with pytest.raises(ValueError, match="shape"):
        grouped_gate_groups(x[:, :5], G, None, thr)


def test_torch_fallback_without_numba(monkeypatch):
    from dynsparse.ops import backend

    monkeypatch.setattr(backend, "numba_available", lambda: False)  # "auto" then resolves to torch
    x, w1, b1, w2, b2, G, thr = _case(23, 16, 64, 8, 8, 0.4, seed=4)
    indptr, groups = grouped_gate_groups(x, G, None, thr)
    y = _grouped(x, w1, b1, w2.t().contiguous(), b2, indptr, groups, 8, 0, backend="auto")
    _close(y, _reference(x, w1, b1, w2, b2, G, thr, 8, 0))
