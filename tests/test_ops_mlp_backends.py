"""Every backend of the sparse MLP ops equals the reference for every strategy and block form; the fake
implementations pass opcheck; torch.compile(fullgraph=True) keeps the ops as graph nodes."""
import pytest
import torch
from torch import nn

from dynsparse import activations
from dynsparse.gating import GatedMLP, GroupedGate, LowRankGate, ReLUSkipMLP
from dynsparse.ops.backend import use_backend
from dynsparse.ops.gates import grouped_gate_groups, lowrank_gate_indices
from dynsparse.ops.mlp import (
    MLPWeights,
    relu_skip_mlp,
    relu_skip_mlp_op,
    sparse_mlp,
    sparse_mlp_op,
)
from dynsparse.ops.mlp.csr import csr_from_mask

CPU_BACKENDS = ("torch", "numba")


def _weights(glu: bool, offset: bool, d=16, d_ff=64, d_out=12, seed=0, dtype=torch.float32):
    """Random MLP tensors; ``dtype`` applies to the weight matrices (vectors stay float32)."""
    g = torch.Generator().manual_seed(seed)
    w = {"w1": torch.randn(d_ff, d, generator=g) / d**0.5, "b1": torch.randn(d_ff, generator=g) * 0.1,
         "w2_t": torch.randn(d_ff, d_out, generator=g) / d_ff**0.5, "b2": torch.randn(d_out, generator=g) * 0.1}
    if glu:
        w["wg"], w["bg"] = torch.randn(d_ff, d, generator=g) / d**0.5, torch.randn(d_ff, generator=g) * 0.1
    if offset:
        w["offset"] = torch.randn(d_ff, generator=g) * 0.2
    return MLPWeights(**{k: v.to(dtype) if v.dim() == 2 else v for k, v in w.items()})


def _lists(m, n, density, seed=1):
    mask = torch.rand(m, n, generator=torch.Generator().manual_seed(seed)) < density
    return csr_from_mask(mask)


def _close(a, b):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() / scale < 1e-4, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("strategy", ["token", "union", "grouped", "auto"])
@pytest.mark.parametrize("m", [1, 5, 150])  # 150 >= UNION_MIN_TOKENS: "auto" can pick the union
def test_every_backend_equals_the_reference(glu, offset, strategy, m):
    w = _weights(glu, offset, seed=m)
    x = torch.randn(m, w.d_model, generator=torch.Generator().manual_seed(m))
    group_size = 8 if strategy == "grouped" else 0
    indptr, indices = _lists(m, w.d_ff // (group_size or 1), 0.3)
    for activation in activations.NAMES:
        kw = dict(activation=activation, strategy=strategy, group_size=group_size)
        ref = sparse_mlp(x, w, indptr, indices, backend="reference", **kw)
        for backend in CPU_BACKENDS:
            _close(sparse_mlp(x, w, indptr, indices, backend=backend, **kw), ref)


def test_reference_is_the_masked_dense_block():
    w = _weights(glu=True, offset=True)
    x = torch.randn(7, w.d_model)
    mask = torch.rand(7, w.d_ff) < 0.4
    indptr, indices = csr_from_mask(mask)
    y = sparse_mlp(x, w, indptr, indices, activation="silu", backend="reference")
    h = torch.nn.functional.silu(x @ w.wg.t() + w.bg) * (x @ w.w1.t() + w.b1) - w.offset
    torch.testing.assert_close(y, (h * mask) @ w.w2_t + w.b2, atol=1e-5, rtol=1e-5)


def test_outputs_keep_the_input_dtype_on_every_backend():
    w = _weights(glu=False, offset=False)
    x = torch.randn(6, w.d_model).bfloat16()
    indptr, indices = _lists(6, w.d_ff, 0.3)
    for backend in ("reference",) + CPU_BACKENDS:
        y = sparse_mlp(x, w, indptr, indices, activation="gelu", backend=backend)
        assert y.dtype == torch.bfloat16 and y.shape == (6, w.d_out)
        assert relu_skip_mlp(x, w, backend=backend).dtype == torch.bfloat16


def test_relu_skip_backends_equal_the_dense_relu_mlp():
    w = _weights(glu=False, offset=False)
    x = torch.randn(20, w.d_model)
    want = torch.relu(x @ w.w1.t() + w.b1) @ w.w2_t + w.b2
    for backend in ("reference",) + CPU_BACKENDS:
        _close(relu_skip_mlp(x, w, backend=backend), want)
    with pytest.raises(ValueError, match="plain ReLU"):
        relu_skip_mlp(x, _weights(glu=True, offset=False))


def test_weights_from_modules_and_compensation():
    fc1, fc2, gate = nn.Linear(16, 64), nn.Linear(64, 12), nn.Linear(16, 64)
    w = MLPWeights.from_linear(fc1, fc2, gate)
    assert w.glu and w.d_ff == 64 and w.d_model == 16 and w.d_out == 12 and w.w2_t.is_contiguous()
    assert torch.equal(w.w2_t, fc2.weight.t()) and not w.w1.requires_grad
    c = torch.randn(64)
    x = torch.randn(9, 16)
    mask = torch.rand(9, 64) < 0.3
    indptr, indices = csr_from_mask(mask)
    y = sparse_mlp(x, w.with_compensation(c), indptr, indices, activation="gelu", backend="numba")
    h = torch.nn.functional.gelu(gate(x)) * fc1(x)
    want = fc2(torch.where(mask, h, c))  # a skipped neuron counts as c_j
    _close(y, want.detach())
    with pytest.raises(TypeError, match="fc1 must be an nn.Linear"):
        MLPWeights.from_linear(nn.ReLU(), fc2)


def test_bad_calls_are_named():
    w = _weights(glu=False, offset=False)
    x = torch.randn(4, w.d_model)
    indptr, indices = _lists(4, w.d_ff, 0.3)
    with pytest.raises(TypeError, match="MLPWeights"):
        sparse_mlp(x, (w.w1, w.b1), indptr, indices, activation="relu")
    with pytest.raises(ValueError, match="strategy"):
        sparse_mlp(x, w, indptr, indices, activation="relu", strategy="rows")
    with pytest.raises(ValueError, match="group_size is for strategy='grouped'"):
        sparse_mlp(x, w, indptr, indices, activation="relu", group_size=8)
    with pytest.raises(ValueError, match="activation"):
        sparse_mlp(x, w, indptr, indices, activation="swish-ish")
    with pytest.raises(ValueError, match="backend"):
        sparse_mlp(x, w, indptr, indices, activation="relu", backend="fast")
    with pytest.raises(ValueError, match="concrete"):
        sparse_mlp_op(x, w.w1, w.b1, w.w2_t, w.b2, None, None, None, indptr, indices, "token", 0, 1, "auto")
    with pytest.raises(ValueError, match="b2 must have shape"):
        MLPWeights(w.w1, w.b1, w.w2_t, torch.zeros(3))


def test_eager_calls_and_the_registered_op_agree():
    """Under no_grad the wrappers run the op's body directly; with grad on they call the op."""
    w = _weights(glu=True, offset=True)
    x = torch.randn(9, w.d_model)
    A, B = torch.randn(w.d_model, 4), torch.randn(4, w.d_ff)
    for backend in CPU_BACKENDS:
        with torch.no_grad():
            lists = lowrank_gate_indices(x, A, B, None, 0.3, backend=backend)
            direct = sparse_mlp(x, w, *lists, activation="gelu", backend=backend)
        via_op = lowrank_gate_indices(x, A, B, None, 0.3, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(lists, via_op))
        torch.testing.assert_close(sparse_mlp(x, w, *via_op, activation="gelu", backend=backend), direct)


def test_fake_impls_pass_opcheck():
    for glu, offset in ((False, False), (True, True)):
        w = _weights(glu, offset, d=8, d_ff=32, d_out=6)
        x = torch.randn(5, 8)
        for strategy, group_size in (("token", 0), ("union", 0), ("grouped", 4), ("auto", 0)):
            indptr, indices = _lists(5, 32 // (group_size or 1), 0.4)
            for backend in ("reference",) + CPU_BACKENDS:
                args = (x, w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, indptr, indices, strategy, group_size,
                        activations.code("gelu"), backend)
                torch.library.opcheck(sparse_mlp_op, args)
    w = _weights(False, False, d=8, d_ff=32, d_out=6)
    for backend in ("reference",) + CPU_BACKENDS:
        torch.library.opcheck(relu_skip_mlp_op, (torch.randn(5, 8), w.w1, w.b1, w.w2_t, None, backend))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_gate_and_sparse_mlp_have_no_graph_break(backend, fresh_dynamo):
    w = _weights(glu=True, offset=True)
    A, B = torch.randn(w.d_model, 4), torch.randn(4, w.d_ff)

    def block(x):
        indptr, indices = lowrank_gate_indices(x, A, B, None, 0.3, backend=backend)
        return sparse_mlp(x, w, indptr, indices, activation="silu", backend=backend) * 2.0

    x = torch.randn(11, w.d_model)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)
    x2 = torch.randn(23, w.d_model)  # another batch size: the data-dependent list length stays symbolic
    torch.testing.assert_close(compiled(x2), block(x2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate_kind", ["lowrank", "grouped"])
def test_compiled_gated_mlp_module_matches_eager(gate_kind, fresh_dynamo):
    torch.manual_seed(0)
    d, d_ff = 16, 64
    gate = LowRankGate(d, d_ff, 4) if gate_kind == "lowrank" else GroupedGate(d, d_ff, 8)
    gate.requires_grad_(False)
    mod = GatedMLP(torch.randn(d_ff, d), torch.randn(d_ff), torch.randn(d, d_ff), torch.randn(d), gate,
                   torch.tensor(0.1), "gelu", compensation=-0.1 * torch.rand(d_ff))
    x = torch.randn(3, 7, d)
    with torch.no_grad():
        eager = mod(x)
        computed = mod.computed
        compiled = torch.compile(mod, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)
    assert mod.computed == 2 * computed  # the counters still count inside the graph


def test_modules_take_the_backend_vocabulary():
    torch.manual_seed(0)
    d, d_ff = 16, 64
    w1, b1, w2, b2 = torch.randn(d_ff, d), torch.randn(d_ff), torch.randn(d, d_ff), torch.randn(d)
    gate = GroupedGate(d, d_ff, 8).requires_grad_(False)
    x = torch.randn(10, d)
    with torch.no_grad():
        ref = GatedMLP(w1, b1, w2, b2, gate, torch.tensor(0.0), "relu", backend="reference")(x)
        for backend in ("auto",) + CPU_BACKENDS:
            _close(GatedMLP(w1, b1, w2, b2, gate, torch.tensor(0.0), "relu", backend=backend)(x), ref)
        skip_ref = ReLUSkipMLP(w1, b1, w2, b2, backend="reference")(x)
        for backend in CPU_BACKENDS:
            _close(ReLUSkipMLP(w1, b1, w2, b2, backend=backend)(x), skip_ref)
        with use_backend("torch"):  # the process-wide setting serves modules left at "auto"
            _close(GatedMLP(w1, b1, w2, b2, gate, torch.tensor(0.0), "relu")(x), ref)
    with pytest.raises(ValueError, match="backend"):
        GatedMLP(w1, b1, w2, b2, gate, torch.tensor(0.0), "relu", backend="kernel")
    with pytest.raises(RuntimeError, match="no autograd"):
        GatedMLP(w1, b1, w2, b2, gate, torch.tensor(0.0), "relu", backend="numba")(x)  # grad enabled
    y = GatedMLP(w1, b1, w2, b2, gate, torch.tensor(0.0), "relu")(x.requires_grad_())
    y.sum().backward()  # "auto" with grad runs the differentiable reference
    assert x.grad is not None
