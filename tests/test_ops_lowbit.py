"""dynsparse_cpp::lowbit_gate_mlp (the low-bit gate's decode op) against its reference, and through GatedMLP."""
import pytest
import torch
from gating_helpers import TEST, calib

from dynsparse import activations
from dynsparse.gating import MGSConfig, apply_gates, fit_gates
from dynsparse.gating.lowbit import LowBitGate
from dynsparse.gating.modules import GatedMLP
from dynsparse.ops._cpp import cpp_available
from dynsparse.ops.mlp import MLPWeights
from dynsparse.ops.mlp.lowbit import lowbit_gate_mlp, pack, round_input, unpack

pytestmark = pytest.mark.skipif(not cpp_available(), reason="the C++ kernels did not build here")


def block(d=64, d_ff=96, d_out=48, glu=True, bits=3, dtype=torch.float32, bias=True, comp=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w1, wg = r(d_ff, d) / d**0.5, r(d_ff, d) / d**0.5 if glu else None
    w2 = r(d_out, d_ff) / d_ff**0.5
    b1, bg = (r(d_ff) * 0.1, r(d_ff) * 0.1 if glu else None) if bias else (None, None)
    x_cal = r(256, d) * torch.linspace(0.2, 4, d)  # uneven channels, as a transformer's
    route, b_route = (wg, bg) if glu else (w1, b1)
    gate = LowBitGate.fit(route, b_route, w1 if glu else None, b1 if glu else None, w2.norm(dim=0), x_cal, bits, 32,
                          0.5, "silu")
    offset = r(d_ff) * 0.05 if comp else None
    b2 = r(d_out) * 0.1 if bias else None
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    weights = MLPWeights(cast(w1), b1, cast(w2.t()), b2, cast(wg), bg, offset)
    return weights, gate, x_cal


def gap_threshold(scores: torch.Tensor, density: float) -> torch.Tensor:
    """A threshold halfway between two neighbouring scores, so rounding order cannot flip a neuron."""
    s = scores.flatten().sort().values
    k = int((1 - density) * s.numel())
    return ((s[k] + s[k + 1]) / 2).reshape(())


@pytest.mark.parametrize("tokens", [1, 2, 5, 15])
@pytest.mark.parametrize("glu,bias,comp", [(True, True, False), (True, False, True), (False, True, True)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_equals_reference(tokens, glu, bias, comp, bits):
    weights, gate, x_cal = block(glu=glu, bias=bias, comp=comp, bits=bits)
    x = x_cal[:tokens] * 1.3
    thr = gap_threshold(gate(x), 0.5)
    want = lowbit_gate_mlp(x, weights, gate.tables(), thr, activation="silu", backend="reference")
    got = lowbit_gate_mlp(x, weights, gate.tables(), thr, activation="silu", backend="cpp")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the reference is the gate's own definition: its mask from the unpacked tables
    mask = gate(x) > thr
    assert 0.3 < mask.float().mean() < 0.7


@pytest.mark.parametrize("d", [32, 96, 288, 576])
@pytest.mark.parametrize("glu", [True, False])
def test_kernel_widths(d, glu):
    """Group counts 1, 3, 9 and 18: the kernel takes two groups per load, the lo term eight at a time, and
    an odd last group on its own."""
    weights, gate, x_cal = block(d=d, glu=glu, seed=d)
    x = x_cal[:2]
    thr = gap_threshold(gate(x), 0.5)
    want = lowbit_gate_mlp(x, weights, gate.tables(), thr, activation="silu", backend="reference")
    got = lowbit_gate_mlp(x, weights, gate.tables(), thr, activation="silu", backend="cpp")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_bf16_tables_activations_and_threads(act, threads):
    weights, gate, x_cal = block(dtype=torch.bfloat16, comp=True)
    x = x_cal[:3]
    gate.act = activations.fn(act)
    thr = gap_threshold(gate(x), 0.4)
    want = lowbit_gate_mlp(x, weights, gate.tables(), thr, activation=act, backend="reference")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = lowbit_gate_mlp(x, weights, gate.tables(), thr, activation=act, backend="cpp")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_kernel_at_threshold_extremes():
    weights, gate, x_cal = block()
    x = x_cal[:2]
    for thr, keep in ((-1.0, True), (1e30, False)):  # everything computed / nothing (then the bias row)
        got = lowbit_gate_mlp(x, weights, gate.tables(), torch.tensor(thr), activation="silu", backend="cpp")
        if keep:
            w = weights
            h = torch.nn.functional.silu(x @ w.wg.t() + w.bg) * (x @ w.w1.t() + w.b1)
            torch.testing.assert_close(got, h @ w.w2_t + w.b2, atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(got, weights.b2.expand(2, -1), atol=0, rtol=0)


def test_rounding_and_packing_are_what_the_kernel_reads():
    x = torch.tensor([[3.0, -1.0, 2.0, 127.0] * 8, [0.5, 1.5, 2.5, -127.0] * 8, [0.0] * 32])
    xq = round_input(x, 32)
    assert torch.equal(xq[0], x[0])  # steps of 1: integers are representable
    assert torch.equal(xq[1, :4], torch.tensor([0.0, 2.0, 2.0, -127.0]))  # ties to even, like nearbyint
    assert torch.equal(xq[2], torch.zeros(32))  # an all-zero group stays zero
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    p = pack(codes)
    assert p.shape == (1, 32) and p[0, 0].item() == 0 and p[0, 1].item() == 1 | (1 << 4)
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    p = pack(codes)
    assert torch.equal(unpack(p), codes)
    # byte b of a group: input b in the low nibble, input b + 16 in the high one
    assert torch.equal(p[:, :16] & 15, codes[:, :16]) and torch.equal(p[:, :16] >> 4, codes[:, 16:32])
    with pytest.raises(ValueError, match="codes < 16"):
        pack(torch.full((1, 32), 16, dtype=torch.uint8))


def test_opcheck():
    weights, gate, x_cal = block(comp=True)
    t, w = gate.tables(), weights
    args = (x_cal[:2], t.route_codes, t.route_scale, t.route_lo, t.up_codes, t.up_scale, t.up_lo, t.in_scale,
            t.w2_norm, t.b_route, t.b_up, w.w1, w.b1, w.w2_t, w.b2, w.wg, w.bg, w.offset, torch.tensor(0.01), 2)
    torch.library.opcheck(torch.ops.dynsparse_cpp.lowbit_gate_mlp.default, args)


def test_bad_tables_are_named():
    weights, gate, x_cal = block()
    t = gate.tables()
    bad = t._replace(route_codes=t.route_codes[:, :8].contiguous())
    with pytest.raises(RuntimeError, match=r"route codes must be contiguous uint8 \(96, 32\)"):
        lowbit_gate_mlp(x_cal[:1], weights, bad, torch.tensor(0.0), activation="silu", backend="cpp")
    bad = t._replace(up_scale=t.up_scale.float())
    with pytest.raises(RuntimeError, match="up scale and lo must be contiguous float16"):
        lowbit_gate_mlp(x_cal[:1], weights, bad, torch.tensor(0.0), activation="silu", backend="cpp")
    with pytest.raises(ValueError, match=r"x must have shape \(M, 64\)"):
        lowbit_gate_mlp(x_cal[:1, :32], weights, t, torch.tensor(0.0), activation="silu", backend="cpp")


def test_gated_mlp_decodes_on_the_kernel_and_prefills_on_the_sparse_op(monkeypatch):
    from test_gating_glu import tiny_llama

    import dynsparse.gating.modules as modules

    m = tiny_llama()
    cfg = MGSConfig(gate="lowbit", target_sparsity=0.5, activity="contribution", min_samples=32)
    gates = fit_gates(m, cfg, calib(), progress=False)
    mods = {}
    for backend in ("reference", "cpp"):
        mods[backend] = tiny_llama()
        apply_gates(mods[backend], gates, backend=backend)
    gated = [mod for mod in mods["cpp"].modules() if isinstance(mod, GatedMLP)]
    assert gated and all(mod.gate.packed for mod in gated)
    calls = []
    kernel = modules.lowbit_gate_mlp
    monkeypatch.setattr(modules, "lowbit_gate_mlp", lambda x, *a, **k: calls.append(x.shape[0]) or kernel(x, *a, **k))
    with torch.no_grad():
        for ids in (TEST["input_ids"][:1, :1], TEST["input_ids"][:1, :8], TEST["input_ids"]):  # 1, 8, 32 tokens
            ref = mods["reference"](input_ids=ids).last_hidden_state
            got = mods["cpp"](input_ids=ids).last_hidden_state
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert calls == [1] * len(gated) + [8] * len(gated)  # 32 tokens ran the sparse MLP op instead
