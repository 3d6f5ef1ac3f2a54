"""``dynsparse::gate_skip_mlp`` (the CATS form): every backend equals the masked dense block in both block
forms, float32 and bfloat16 weights, on every kernel path (one thread, split neurons, a thread per token);
the fake implementation passes opcheck; CATSMLP compiles with the op as one graph node."""
import numba
import pytest
import torch
import torch.nn.functional as F
from test_ops_mlp_backends import CPU_BACKENDS, _close, _weights

from dynsparse import activations
from dynsparse.gating.baselines import CATSMLP
from dynsparse.ops.mlp import GATE_SKIP_DENSE_TOKENS, gate_skip_mlp, gate_skip_mlp_op

BACKENDS = CPU_BACKENDS + ("cpp",)  # the C++ kernels build here (g++ and ninja); a failed build fails these


def _gate_act(x, w, activation):
    gate, bias = (w.wg, w.bg) if w.glu else (w.w1, w.b1)
    return activations.fn(activation)(F.linear(x.float(), gate.float(), None if bias is None else bias.float()))


def _threshold(a, share=0.5):
    """A threshold about ``share`` of |a| falls under, midway in the widest gap near that quantile, so
    float summation order cannot move a neuron across it."""
    v = a.abs().flatten().double().sort().values
    lo, hi = int(len(v) * (share - 0.1)), int(len(v) * (share + 0.1))
    gaps = v[lo + 1 : hi + 1] - v[lo:hi]
    k = lo + int(gaps.argmax())
    assert gaps.max() > 1e-5
    return torch.tensor(float((v[k] + v[k + 1]) / 2))


def test_reference_is_the_masked_dense_block():
    w = _weights(True, True)
    x = torch.randn(5, 16)
    a = _gate_act(x, w, "silu")
    t = _threshold(a)
    h = a * F.linear(x, w.w1, w.b1) - w.offset
    want = (h * (a.abs() > t)) @ w.w2_t + w.b2
    _close(gate_skip_mlp(x, w, t, activation="silu", backend="reference"), want)
    assert 0.3 < float((a.abs() > t).float().mean()) < 0.7


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 15, 40])  # 40 >= GATE_SKIP_DENSE_TOKENS: masked dense matmuls
def test_every_backend_equals_the_reference(glu, offset, dtype, m):
    assert 15 < GATE_SKIP_DENSE_TOKENS <= 40  # both sides of the switch are covered
    w = _weights(glu, offset, dtype=dtype, seed=m)
    x = torch.randn(m, w.d_model, generator=torch.Generator().manual_seed(m))
    for activation in activations.NAMES:
        t = _threshold(_gate_act(x, w, activation))
        ref = gate_skip_mlp(x, w, t, activation=activation, backend="reference")
        for backend in BACKENDS:
            _close(gate_skip_mlp(x, w, t, activation=activation, backend=backend), ref)


@pytest.mark.parametrize("backend", ["numba", "cpp"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_paths_at_decode_size(backend, threads, m, dtype):
    """Shapes big enough for numba's split (one token, two threads) and per-token (four tokens) paths, and
    for the cpp kernel's neurons to split over torch's threads (partial outputs summed after)."""
    if backend == "numba" and threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("needs two numba threads")
    w = _weights(True, True, d=128, d_ff=2048, d_out=256, dtype=dtype)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(5))
    t = _threshold(_gate_act(x, w, "silu"), 0.3)
    get, put = (numba.get_num_threads, numba.set_num_threads) if backend == "numba" else \
        (torch.get_num_threads, torch.set_num_threads)
    before = get()
    put(threads)
    try:
        got = gate_skip_mlp(x, w, t, activation="silu", backend=backend)
    finally:
        put(before)
    _close(got, gate_skip_mlp(x, w, t, activation="silu", backend="reference"))
    assert got.dtype == torch.float32
    assert gate_skip_mlp(x.bfloat16(), w, t, activation="silu", backend=backend).dtype == torch.bfloat16


def test_nothing_kept_gives_the_bias_and_all_kept_the_dense_block():
    w = _weights(True, False)
    x = torch.randn(3, 16)
    for backend in ("reference",) + BACKENDS:
        _close(gate_skip_mlp(x, w, torch.tensor(1e9), activation="silu", backend=backend), w.b2.expand(3, -1))
        dense = (F.silu(F.linear(x, w.wg, w.bg)) * F.linear(x, w.w1, w.b1)) @ w.w2_t + w.b2
        _close(gate_skip_mlp(x, w, torch.tensor(-1.0), activation="silu", backend=backend), dense)


def test_fake_implementation_passes_opcheck():
    w = _weights(True, True)
    x = torch.randn(4, 16)
    t = torch.tensor(0.1)
    for backend in ("reference", "torch", "numba", "cpp"):
        torch.library.opcheck(gate_skip_mlp_op, (x, w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, t,
                                                 activations.code("silu"), backend))
    torch.library.opcheck(torch.ops.dynsparse_cpp.gate_skip_mlp.default,
                          (x, w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, t, activations.code("silu")))


def test_cats_block_compiles_as_one_graph_with_the_op():
    torch.manual_seed(0)
    w1, wg, w2 = torch.randn(64, 16) / 4, torch.randn(64, 16) / 4, torch.randn(16, 64) / 8
    block = CATSMLP(w1, None, w2, None, 0.05, "silu", compensation=torch.full((64,), 0.01), wg=wg).eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        want = block.forward_reference(x)
        _close(block(x), want)
        explanation = torch._dynamo.explain(block)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        assert "gate_skip_mlp" in "\n".join(g.code for g in explanation.graphs)
        _close(torch.compile(block, fullgraph=True)(x), want)
        block.backend = "cpp"  # the C++ op is a graph node of its own
        explanation = torch._dynamo.explain(block)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        assert "dynsparse_cpp.gate_skip_mlp" in "\n".join(g.code for g in explanation.graphs)
        _close(torch.compile(block, fullgraph=True)(x), want)


def test_bad_input_is_one_line():
    w = _weights(True, False)
    x = torch.randn(2, 16)
    with pytest.raises(TypeError, match="threshold must be a 0-dim floating tensor"):
        gate_skip_mlp(x, w, 0.5, activation="silu")
    with pytest.raises(TypeError, match="threshold must be a 0-dim floating tensor"):
        gate_skip_mlp(x, w, torch.tensor([0.5]), activation="silu")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        gate_skip_mlp(x, w, torch.tensor(0.5), activation="silu", backend="triton")
    with pytest.raises(TypeError, match="MLPWeights"):
        gate_skip_mlp(x, {"w1": w.w1}, torch.tensor(0.5), activation="silu")
    with pytest.raises(ValueError, match="d_model"):
        gate_skip_mlp(torch.randn(2, 15), w, torch.tensor(0.5), activation="silu")
