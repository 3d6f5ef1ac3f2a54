"""dynsparse::gemv (a few-token linear layer) and the decoder's routing of nn.Linear through it."""
import pytest
import torch
from torch import nn

from dynsparse.decode import FastDecoder, GemvLinear, gemv_active, route_linears_
from dynsparse.ops.dense import GEMV_MAX_TOKENS, gemv, gemv_op, gemv_reference
from dynsparse import activations

pytest.importorskip("numba")


def weights(n=37, d=29, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) / d ** 0.5).to(dtype), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("backend", ["cpp", "numba", "torch", "reference"])
@pytest.mark.parametrize("tokens", [1, 3, GEMV_MAX_TOKENS - 1, GEMV_MAX_TOKENS, 40])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_equals_the_reference(backend, tokens, wdtype, bias):
    w, b = weights(dtype=wdtype)
    b = b if bias else None
    x = torch.randn(tokens, w.shape[1], generator=torch.Generator().manual_seed(1))
    want = gemv_reference(x, w, b, activations.code("identity"))
    got = gemv(x, w, b, backend=backend)
    assert got.dtype == x.dtype and got.shape == (tokens, w.shape[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 compute on every path


@pytest.mark.parametrize("backend", ["cpp", "numba"])
@pytest.mark.parametrize("activation", activations.NAMES)
def test_gemv_activation_and_leading_dims(activation, backend):
    w, b = weights()
    x = torch.randn(1, 2, w.shape[1])
    want = activations.REGISTRY[activation].fn(torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(gemv(x, w, b, activation=activation, backend=backend), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_gemv_splits_rows_over_torch_threads(threads):
    w, b = weights(n=3000, d=64)
    x = torch.randn(2, 64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = gemv(x, w, b, backend="cpp")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, gemv_reference(x, w, b, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_gemv_bf16_activations_come_back_in_bf16(backend):
    w, b = weights(dtype=torch.bfloat16)
    x = torch.randn(2, w.shape[1]).to(torch.bfloat16)
    got = gemv(x, w, b, backend=backend)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, gemv_reference(x, w, b, 4).to(torch.bfloat16))


def test_gemv_op_registration_and_compile():
    w, b = weights()
    x = torch.randn(2, w.shape[1])
    torch.library.opcheck(gemv_op, (x, w, b, 4, "numba"))
    torch.library.opcheck(gemv_op, (x, w, b, 4, "cpp"))
    torch.library.opcheck(torch.ops.dynsparse_cpp.gemv.default, (x, w, b, 4))
    for backend in ("numba", "cpp"):
        fn = torch.compile(lambda x: gemv(x, w, b, backend=backend), fullgraph=True)
        torch.testing.assert_close(fn(x), gemv_reference(x, w, b, 4))
    explanation = torch._dynamo.explain(lambda x: gemv(x, w, b, backend="cpp"))(x)
    assert explanation.graph_break_count == 0
    assert "dynsparse_cpp.gemv" in explanation.graphs[0].code  # the C++ op itself, no Python body


@pytest.mark.parametrize("args, match", [
    (dict(x=torch.randn(2, 5)), "x \\(M, d\\) and w \\(N, d\\)"),
    (dict(b=torch.randn(3)), "bias must have shape \\(37,\\)"),
    (dict(act_code=99), "act_code must be one of"),
    (dict(backend="auto"), "concrete one of"),
    (dict(backend="triton"), "no triton backend"),
])
def test_gemv_bad_input_is_one_line(args, match):
    w, b = weights()
    call = dict(x=torch.randn(2, w.shape[1]), w=w, b=b, act_code=4, backend="numba") | args
    with pytest.raises(ValueError, match=match) as e:
        gemv_op(call["x"], call["w"], call["b"], call["act_code"], call["backend"])
    assert "\n" not in str(e.value)


def test_routed_linears_are_plain_linears_outside_the_decoder():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(29, 37), nn.ReLU(), nn.Linear(37, 5, bias=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 29)
    want = model(x)
    assert route_linears_(model) == 2 and route_linears_(model) == 2  # idempotent
    assert isinstance(model[0], GemvLinear) and isinstance(model[0], nn.Linear)
    assert model.state_dict().keys() == state.keys()
    assert torch.equal(model(x), want)  # outside gemv_active: F.linear exactly
    with gemv_active():
        assert torch.equal(model(x), want)  # grad enabled: F.linear
        with torch.no_grad():
            fast = model(x)
            long = model(torch.randn(GEMV_MAX_TOKENS, 29))
        assert long.shape == (GEMV_MAX_TOKENS, 5)
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)


def test_decoder_routes_linears_and_can_leave_them():
    from test_decode import NEW, hf_tokens, prompt, tiny_llama

    model = tiny_llama()
    ids = prompt()
    want = hf_tokens(model, ids)
    dec = FastDecoder(model, 32, compile=False)  # linears="gemv", the default
    assert any(isinstance(m, GemvLinear) for m in model.modules())
    assert torch.equal(dec.generate(ids, NEW), want)
    assert torch.equal(hf_tokens(model, ids), want)  # HF's generate on the routed model: unchanged
    other = tiny_llama()
    FastDecoder(other, 32, compile=False, linears="torch")
    assert not any(isinstance(m, GemvLinear) for m in other.modules())
    with pytest.raises(ValueError, match="linears must be one of"):
        FastDecoder(tiny_llama(), 32, compile=False, linears="blas")


def test_compiled_decode_step_is_one_graph_with_gemv():
    from test_decode import NEW, _graphs_and_breaks, hf_tokens, prompt, tiny_llama

    model = tiny_llama()
    route_linears_(model)
    with gemv_active():
        explanation, code = _graphs_and_breaks(model)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert "gemv" in code
    ids = prompt()
    dec = FastDecoder(model, 32, compile_prefill=False, linears="gemv")
    assert torch.equal(dec.generate(ids, NEW), hf_tokens(model, ids)) and dec.fallback == {}


def test_cpp_gemv_bad_input_is_one_line():
    w, b = weights()
    with pytest.raises(ValueError, match="x \\(M, d\\) and w \\(N, d\\)") as e:
        gemv(torch.randn(2, 5), w, b, backend="cpp")  # the wrapper checks before the C++ op runs
    assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="act_code must be 0-4, got 9") as e:
        torch.ops.dynsparse_cpp.gemv(torch.randn(2, w.shape[1]), w, b, 9)  # the op's own check
    assert "\n" not in str(e.value).strip()


def test_a_failed_cpp_build_leaves_auto_on_numba_and_names_the_reason(monkeypatch, capsys):
    from torch.utils import cpp_extension

    from dynsparse.ops import _cpp, resolve

    assert _cpp.cpp_available() and resolve("auto", torch.device("cpu"), ("numba", "cpp")) == "cpp"
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    _cpp._build.cache_clear()
    try:
        assert not _cpp.cpp_available()
        assert "ninja" in capsys.readouterr().err
        assert resolve("auto", torch.device("cpu"), ("numba", "cpp")) == "numba"
        with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable: .*pip install ninja") as e:
            gemv(torch.randn(1, 29), weights()[0], backend="cpp")
        assert "\n" not in str(e.value)
    finally:
        monkeypatch.undo()
        _cpp._build.cache_clear()
    assert _cpp.cpp_available()
