"""Gate ops: the CSR lists they write are the dense gate's decisions, on every backend."""
import pytest
import torch

from dynsparse.ops.gates import (
    GATE_BACKENDS,
    grouped_gate_groups,
    grouped_gate_groups_op,
    grouped_gate_indices,
    grouped_gate_indices_op,
    lowrank_gate_indices,
    lowrank_gate_indices_op,
)


def _mask_from_csr(indptr, indices, m, d_ff):
    mask = torch.zeros(m, d_ff, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(m), indptr[1:] - indptr[:-1])
    mask[rows, indices.long()] = True
    return mask


@pytest.mark.parametrize("backend", GATE_BACKENDS)
@pytest.mark.parametrize("per_neuron", [False, True])
def test_lowrank_gate_matches_dense_logits(per_neuron, backend):
    g = torch.Generator().manual_seed(3)
    m, d, r, d_ff = 53, 32, 6, 1100  # d_ff not a multiple of the kernel's tile
    x, A, B, c = torch.randn(m, d, generator=g), torch.randn(d, r, generator=g), torch.randn(r, d_ff, generator=g), torch.randn(d_ff, generator=g)
    thr = torch.randn(d_ff, generator=g) * 2 + 3 if per_neuron else 4.0
    indptr, indices = lowrank_gate_indices(x, A, B, c, thr, backend=backend)
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


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_grouped_gate_expands_groups(backend):
    g = torch.Generator().manual_seed(4)
    m, d, n_groups, gs = 41, 16, 12, 8
    x, G, c = torch.randn(m, d, generator=g), torch.randn(d, n_groups, generator=g), torch.randn(n_groups, generator=g)
    indptr, indices = grouped_gate_indices(x, G, c, 1.0, gs, backend=backend)
    logits = x @ G + c
    want = (logits > 1.0).repeat_interleave(gs, dim=1)
    got = _mask_from_csr(indptr, indices, m, n_groups * gs)
    decided = ((logits - 1.0).abs() > 1e-4).repeat_interleave(gs, dim=1)
    assert torch.equal(got[decided], want[decided])
    assert 0.05 < got.float().mean() < 0.95


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_grouped_gate_groups_lists_the_groups_on(backend):
    g = torch.Generator().manual_seed(5)
    m, d, n_groups = 30, 16, 16
    x, G, c = torch.randn(m, d, generator=g), torch.randn(d, n_groups, generator=g), torch.randn(n_groups, generator=g)
    thr = torch.randn(n_groups, generator=g)
    indptr, groups = grouped_gate_groups(x, G, c, thr, backend=backend)
    on = x @ G + c > thr
    for i in range(m):
        assert groups[indptr[i]:indptr[i + 1]].tolist() == on[i].nonzero()[:, 0].tolist()


def test_numba_and_reference_lists_are_identical():
    g = torch.Generator().manual_seed(6)
    x, A, B = torch.randn(64, 16, generator=g), torch.randn(16, 4, generator=g), torch.randn(4, 300, generator=g)
    G = torch.randn(16, 10, generator=g)
    for fn, args in ((lowrank_gate_indices, (x, A, B, None, 1.0)), (grouped_gate_indices, (x, G, None, 0.5, 4)),
                     (grouped_gate_groups, (x, G, None, 0.5))):
        ref = fn(*args, backend="reference")
        fast = fn(*args, backend="numba")
        # the scan sums in another order than BLAS: only near-ties may differ, and none are this close here
        assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1]), fn.__name__


def test_fake_impls_pass_opcheck():
    g = torch.Generator().manual_seed(7)
    x, A, B, c = torch.randn(9, 8, generator=g), torch.randn(8, 3, generator=g), torch.randn(3, 40, generator=g), torch.randn(40, generator=g)
    G, cg = torch.randn(8, 5, generator=g), torch.randn(5, generator=g)
    thr = torch.tensor(0.2)
    for backend in GATE_BACKENDS:
        torch.library.opcheck(lowrank_gate_indices_op, (x, A, B, c, thr, backend))
        torch.library.opcheck(grouped_gate_indices_op, (x, G, cg, thr, 4, backend))
        torch.library.opcheck(grouped_gate_groups_op, (x, G, None, thr.expand(5), backend))


def test_bad_gate_inputs_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="A must be"):
        lowrank_gate_indices(x, torch.randn(8, 3), torch.randn(4, 10), None, 0.0)
    with pytest.raises(ValueError, match="c must have shape"):
        lowrank_gate_indices(x, torch.randn(8, 3), torch.randn(3, 10), torch.zeros(9), 0.0)
    with pytest.raises(ValueError, match="G must be"):
        grouped_gate_groups(x, torch.randn(8), None, 0.0)
    with pytest.raises(ValueError, match="backend"):
        grouped_gate_groups(x, torch.randn(8, 2), None, 0.0, backend="triton")
