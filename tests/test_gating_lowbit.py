"""The low-bit MGS gate: quantization, its score against the block's true contribution, fit / save / load,
and its fast path against the reference."""
import pytest
import torch
from gating_helpers import TEST, calib, tiny_gpt2
from test_gating_glu import block_inputs, tiny_llama

from dynsparse import find_mlps
from dynsparse.gating import GateSet, MGSConfig, apply_gates, fit_gates, record_activations
from dynsparse.gating.lowbit import LowBitGate, dequantize, input_scale, quantize
from dynsparse.gating.modules import GatedMLP


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantize_round_trips_within_half_a_step(bits):
    w = torch.randn(24, 64) * torch.linspace(0.1, 3, 64)
    codes, scale, lo = quantize(w, bits, 16)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    assert scale.dtype == lo.dtype == torch.float16
    wr = w.reshape(24, 4, 16)
    err = (dequantize(codes, scale, lo).reshape(24, 4, 16) - wr).abs()
    # half a step, plus what storing lo and scale in float16 moves the grid by
    slop = 2**-10 * (wr.abs().amax(-1, keepdim=True) + scale.float()[..., None] * 2**bits)
    assert (err <= scale.float()[..., None] / 2 + slop).all()
    # every group's minimum is a code (up to lo's float16 rounding)
    assert ((dequantize(codes, scale, lo).reshape(24, 4, 16).amin(-1) - wr.amin(-1)).abs() <= slop[..., 0]).all()
    with pytest.raises(ValueError, match="quant_group 24 must divide the input width 64"):
        quantize(w, bits, 24)


def test_input_scale_is_rms_power_with_mean_one():
    x = torch.randn(500, 8) * torch.tensor([1, 2, 4, 8, 1, 1, 1, 16.0])
    s = input_scale(x, 0.5)
    assert s.mean().item() == pytest.approx(1.0)
    rms = x.pow(2).mean(0).sqrt()
    torch.testing.assert_close(s / s[0], (rms / rms[0]).sqrt())
    torch.testing.assert_close(input_scale(x, 0.0), torch.ones(8))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_eight_bit_scores_are_the_contributions(make):
    m = make()
    for name, x in block_inputs(m, calib(2)).items():
        blk = find_mlps(m)[name]
        w_route, b_route = blk.routing_weights()
        up, up_b, w2, _ = blk.linear_weights()
        gate = LowBitGate.fit(w_route, b_route, up if blk.gated else None, up_b if blk.gated else None,
                              w2.detach().norm(dim=0), x, 8, 16, 0.5, "gelu" if not blk.gated else "silu", blk.act)
        with torch.no_grad():
            h = blk.act(blk.gate_proj(x)) * blk.fc1(x) if blk.gated else blk.act(blk.fc1(x))
            want = h.abs() * w2.detach().norm(dim=0)
            got = gate(x)
        assert (got - want).abs().max() < 0.02 * want.abs().max()  # 8 bits: within a percent of the range
        # ... and ranking by them keeps nearly the same neurons
        k = want.shape[1] // 2
        overlap = (torch.zeros_like(want).scatter_(1, want.topk(k).indices, 1)
                   * torch.zeros_like(got).scatter_(1, got.topk(k).indices, 1)).sum() / want.numel() * 2
        assert overlap > 0.9


def test_fewer_bits_predict_worse():
    m = tiny_llama()
    stats = record_activations(m, calib(), activity="contribution", target_sparsity=0.5, progress=False)
    recall = {}
    for bits in (1, 3, 8):
        cfg = MGSConfig(gate="lowbit", bits=bits, quant_group=16, target_sparsity=0.5, activity="contribution",
                        min_samples=32)
        gates = fit_gates(m, cfg, stats=stats, progress=False)
        recall[bits] = sum(r["recall"] for r in gates.report.values()) / len(gates.report)
        for r in gates.report.values():
            assert r["gated_density"] == pytest.approx(0.5, abs=0.02)
            assert "train_loss" not in r  # calibrated, not trained
    assert recall[1] < recall[3] < recall[8]
    assert recall[8] > 0.95


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_lowbit_gates_save_load_and_run_like_the_reference(make, tmp_path):
    m = make()
    with torch.no_grad():
        dense = m(**TEST).last_hidden_state
    cfg = MGSConfig(gate="lowbit", quant_group=16, target_sparsity=0.0, activity="contribution", min_samples=32)
    gates = fit_gates(m, cfg, calib(), progress=False)
    apply_gates(m, gates)
    with torch.no_grad():  # target 0: every neuron computed, the dense model
        torch.testing.assert_close(m(**TEST).last_hidden_state, dense, atol=1e-4, rtol=1e-4)

    m = make()
    cfg = MGSConfig(gate="lowbit", quant_group=16, target_sparsity=0.5, activity="contribution", min_samples=32)
    gates = fit_gates(m, cfg, calib(), progress=False)
    path = gates.save(tmp_path / "g")
    loaded = GateSet.load(path)
    for name, ts in gates.tensors.items():
        assert set(loaded.tensors[name]) == set(ts)
        for k, v in ts.items():
            assert torch.equal(loaded.tensors[name][k], v)
    outs = {}
    for backend in ("reference", "torch", "numba"):
        m2 = make()
        apply_gates(m2, loaded, backend=backend)
        mods = [mod for mod in m2.modules() if isinstance(mod, GatedMLP)]
        assert mods and all(isinstance(mod.gate, LowBitGate) for mod in mods)
        with torch.no_grad():
            outs[backend] = m2(**TEST).last_hidden_state
        assert 0.3 < sum(mod.last_density for mod in mods) / len(mods) < 0.7
    for backend in ("torch", "numba"):
        torch.testing.assert_close(outs[backend], outs["reference"], atol=1e-4, rtol=1e-4)


def test_bad_lowbit_inputs_are_named(tmp_path):
    for kw, msg in ((dict(bits=0), r"bits must be an int in \[1, 8\]"), (dict(bits=9), "bits must be"),
                    (dict(bits=2.5), "bits must be"), (dict(quant_group=0), "quant_group must be a positive int"),
                    (dict(smoothing=1.5), r"smoothing must be in \[0, 1\]"), (dict(gate="lowbits"), "gate must be one of")):
        with pytest.raises(ValueError, match=msg):
            MGSConfig(target_sparsity=0.5, activity="contribution", **{"gate": "lowbit", **kw})
    m = tiny_llama()
    with pytest.raises(ValueError, match="quant_group 12 does not divide d_model 32"):
        fit_gates(m, MGSConfig(gate="lowbit", quant_group=12, target_sparsity=0.5, activity="contribution",
                               min_samples=32), calib(), progress=False)
    gates = fit_gates(m, MGSConfig(gate="lowbit", quant_group=16, target_sparsity=0.5, activity="contribution",
                                   min_samples=32), calib(), progress=False)
    name = next(iter(gates.tensors))
    gates.tensors[name]["gate.up_codes"] = gates.tensors[name]["gate.up_codes"][:, :8]
    with pytest.raises(ValueError, match=r"gate.up_codes is torch.uint8 \(\d+, 8\), expected"):
        apply_gates(tiny_llama(), gates)
    del gates.tensors[name]["gate.up_codes"]
    with pytest.raises(ValueError, match="low-bit gate is missing gate.up_codes"):
        apply_gates(tiny_llama(), gates)
