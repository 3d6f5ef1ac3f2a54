"""SIBS and MGS: the installed modules compute what their definitions say, gates meet their calibrated
recall on held-out rows, gate files round-trip, and bad input is named."""

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import calib, out, tiny_gpt2, tiny_opt

from dynsparse.gating import (
    GatedMLP,
    GateSet,
    GroupedGate,
    LowRankGate,
    MGSConfig,
    ReLUSkipMLP,
    SIBSConfig,
    SlicedMLP,
    fit_gates,
    load_gates,
    record_activations,
    sparsify_,
)


def mlp_ref(x, w1, b1, w2, b2, act, mask=None, fill=None):
    a = act(F.linear(x, w1, b1))
    if mask is not None:
        a = torch.where(mask, a, fill if fill is not None else torch.zeros_like(a))
    return F.linear(a, w2, b2)


@pytest.mark.parametrize("make", [tiny_opt, tiny_gpt2])
def test_sibs_zero_sparsity_is_exact(make):
    m = make()
    ref = out(m)
    sparsify_(m, SIBSConfig(target_sparsity=0.0), calib=calib(2))
    assert torch.allclose(out(m), ref, atol=1e-5)


def test_sliced_mlp_matches_masked_reference_with_compensation():
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(64, 16), torch.randn(64), torch.randn(16, 64), torch.randn(16)
    kept = torch.tensor([1, 5, 9, 40, 63])
    mean_a = torch.randn(64).double()
    removed = torch.ones(64, dtype=torch.bool)
    removed[kept] = False
    shift = (w2.double()[:, removed] @ mean_a[removed]).float()
    mod = SlicedMLP(w1, b1, w2, b2, kept, "gelu", shift)
    x = torch.randn(10, 16)
    keep_mask = ~removed.expand(10, 64)
    ref = mlp_ref(x, w1, b1, w2, b2, F.gelu, keep_mask, mean_a.float().expand(10, 64))
    assert torch.allclose(mod(x), ref, atol=1e-4)
    assert mod.fc1.weight.shape == (5, 16) and mod.fc2.weight.shape == (16, 5)


def test_sibs_threshold_and_target_select_lowest_frequency():
    m = tiny_opt()
    stats = record_activations(m, calib(4))
    g = fit_gates(m, SIBSConfig(target_sparsity=0.5), stats=stats)
    for name, ts in g.tensors.items():
        f = stats[name].firing_frequency
        kept = ts["kept"]
        assert len(kept) == 64
        removed = torch.ones(128, dtype=torch.bool)
        removed[kept] = False
        assert f[kept].min() >= f[removed].max()
    g = fit_gates(m, SIBSConfig(threshold=0.2), stats=stats)
    for name, ts in g.tensors.items():
        assert torch.equal(ts["kept"], torch.nonzero(stats[name].firing_frequency >= 0.2).flatten())


class _MLP(torch.nn.Module):
    def __init__(self, d=16, d_ff=64):
        super().__init__()
        self.fc1, self.fc2, self.act = torch.nn.Linear(d, d_ff), torch.nn.Linear(d_ff, d), torch.nn.ReLU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x):
        return self.mlp(x)


@pytest.mark.parametrize("compensate", [False, True])
def test_sibs_output_error_keeps_a_rare_but_massive_neuron_and_beats_frequency(compensate):
    # neuron 7 fires on ~1 % of tokens (x[0] > 2.3) but hugely: frequency removes it first, output_error
    # keeps it, and the block sliced by output_error is closer to dense on the calibration rows
    from dynsparse.gating.sibs import build_sliced, removal_error, sibs_tensors
    from dynsparse.mlps import find_mlps

    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        net.mlp.fc1.weight[7] = 0.0
        net.mlp.fc1.weight[7, 0] = 50.0
        net.mlp.fc1.bias[7] = -50.0 * 2.3
    x = torch.randn(4000, 16)
    block = find_mlps(net)["mlp"]
    stats = record_activations(net, [{"x": x[i:i + 500]} for i in range(0, 4000, 500)])["mlp"]
    assert 0 < stats.firing_frequency[7] < 0.02
    by_error = SIBSConfig(target_sparsity=0.5, compensate=compensate, criterion="output_error")
    by_freq = SIBSConfig(target_sparsity=0.5, compensate=compensate)
    kept_err, kept_freq = sibs_tensors(block, stats, by_error)["kept"], sibs_tensors(block, stats, by_freq)["kept"]
    assert 7 in kept_err and 7 not in kept_freq
    err = removal_error(stats, block.fc2.weight, compensate)
    removed = torch.ones(64, dtype=torch.bool)
    removed[kept_err] = False
    assert err[kept_err].min() >= err[removed].max()
    with torch.no_grad():
        dense = net.mlp(x)
        errs = {cfg.criterion: (build_sliced(block, sibs_tensors(block, stats, cfg), "relu")(x) - dense).pow(2).mean()
                for cfg in (by_error, by_freq)}
    assert errs["output_error"] < errs["frequency"]


@pytest.mark.parametrize("gate", ["lowrank", "grouped"])
@pytest.mark.parametrize("act,compensated", [("relu", False), ("gelu", True)])
def test_gated_mlp_fast_path_equals_reference(gate, act, compensated):
    torch.manual_seed(0)
    d, d_ff = 16, 64
    w1, b1, w2, b2 = torch.randn(d_ff, d), torch.randn(d_ff), torch.randn(d, d_ff), torch.randn(d)
    comp = -0.1 * torch.rand(d_ff) if compensated else None  # a skipped GELU neuron's mean output
    g = LowRankGate(d, d_ff, 4) if gate == "lowrank" else GroupedGate(d, d_ff, 8)
    g.requires_grad_(False)
    mod = GatedMLP(w1, b1, w2, b2, g, torch.tensor(0.1), act, compensation=comp, backend="numba")
    x = torch.randn(3, 7, d)
    with torch.no_grad():
        fast, ref = mod(x), mod.forward_reference(x)
        mask = mod.gate_mask(x.reshape(-1, d))
    assert torch.allclose(fast, ref, atol=1e-4)
    act_fn = F.relu if act == "relu" else F.gelu
    direct = mlp_ref(x.reshape(-1, d), w1, b1, w2, b2, act_fn, mask, comp).reshape(3, 7, d)
    assert torch.allclose(ref, direct, atol=1e-4)
    assert 0 < mod.last_density < 1


def test_relu_skip_is_exact():
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(64, 16), torch.randn(64), torch.randn(16, 64), torch.randn(16)
    x = torch.randn(9, 16)
    with torch.no_grad():
        assert torch.allclose(ReLUSkipMLP(w1, b1, w2, b2)(x), mlp_ref(x, w1, b1, w2, b2, F.relu), atol=1e-4)


@pytest.mark.parametrize("cfg", [MGSConfig(target_recall=0.95, steps=60, rank=8),
                                 MGSConfig(gate="grouped", group_size=8, target_recall=0.9, steps=60)])
def test_mgs_meets_target_recall_on_holdout_and_runs(cfg):
    m = tiny_opt()
    ref = out(m)
    g = sparsify_(m, cfg, calib=calib())
    for r in g.report.values():
        assert r["recall"] >= cfg.target_recall - 1e-6
        assert r["natural_density"] <= r["gated_density"] / r["recall"] + 1e-6  # tp <= predicted
    o = out(m)
    cos = F.cosine_similarity(o.flatten(1), ref.flatten(1)).min().item()
    assert cos > 0.9


def test_mgs_recall_one_with_relu_is_exact_where_the_gate_covers_the_active_set():
    # calibrated for recall 1 on held-out rows: on every row whose active set the gate covers, the gated
    # ReLU MLP equals the dense one (skipped neurons are exact zeros), and at least the held-out rows qualify
    m = tiny_opt()
    stats = record_activations(m, calib(4), max_samples=10**6)
    g = fit_gates(m, MGSConfig(target_recall=1.0, steps=30, rank=8), stats=stats)
    name = next(iter(g.tensors))
    from dynsparse.gating.mgs import build_gated
    from dynsparse.mlps import find_mlps

    block = find_mlps(m)[name]
    mod = build_gated(block, g.tensors[name], "relu")
    x, active = stats[name].samples_x, stats[name].samples_active
    w1, b1, w2, b2 = block.linear_weights()
    with torch.no_grad():
        covered = (mod.gate_mask(x) | ~active).all(1)
        assert covered.sum() >= g.report[name]["holdout_rows"]
        assert torch.allclose(mod(x)[covered], mlp_ref(x, w1, b1, w2, b2, F.relu)[covered], atol=1e-4)


def test_gate_file_round_trip_and_mismatch(tmp_path):
    m = tiny_gpt2()
    g = sparsify_(m, MGSConfig(target_recall=0.9, steps=20, rank=4), calib=calib(4))
    g.save(tmp_path / "g")
    assert (tmp_path / "g" / "gates.safetensors").is_file()
    m2 = tiny_gpt2()
    g2 = load_gates(m2, tmp_path / "g")
    assert g2.method == "mgs" and g2.report == g.report
    assert torch.allclose(out(m2), out(m), atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        load_gates(tiny_opt(), tmp_path / "g")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "gates.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        GateSet.load(tmp_path / "bad")


def test_bad_configs_and_too_little_calibration():
    with pytest.raises(ValueError, match="exactly one"):
        SIBSConfig()
    with pytest.raises(ValueError, match="criterion must be"):
        SIBSConfig(target_sparsity=0.5, criterion="magnitude")
    with pytest.raises(ValueError, match="takes target_sparsity"):
        SIBSConfig(threshold=0.1, criterion="output_error")
    with pytest.raises(ValueError, match="at most one"):
        MGSConfig(target_recall=0.9, target_sparsity=0.5)
    with pytest.raises(ValueError, match="gate must be"):
        MGSConfig(gate="dense")
    with pytest.raises(ValueError, match="need >= 64"):
        sparsify_(tiny_opt(), MGSConfig(), calib=[{"input_ids": torch.zeros(1, 4, dtype=torch.long)}])
    with pytest.raises(TypeError, match="SIBSConfig, MGSConfig or CATSConfig"):
        sparsify_(tiny_opt(), object(), calib=calib(1))


def test_sibs_compensation_minimises_error_on_calibration_rows():
    # the bias shift is E[W2 a_removed] on the calibration tokens: the MSE-best constant there
    from dynsparse.gating.sibs import build_sliced, sibs_tensors
    from dynsparse.mlps import find_mlps

    m = tiny_gpt2()
    stats = record_activations(m, calib(4), max_samples=10**6)
    name, block = next(iter(find_mlps(m).items()))
    x = stats[name].samples_x
    with torch.no_grad():
        dense = block.fc2(block.act(block.fc1(x)))
        errs = {}
        for comp in (False, True):
            mod = build_sliced(block, sibs_tensors(block, stats[name], SIBSConfig(target_sparsity=0.5, compensate=comp)),
                               "gelu")
            diff = dense - mod(x)
            errs[comp] = diff.pow(2).mean().item()
            if comp:
                assert diff.mean(0).abs().max() < 1e-4  # residual has zero mean: the constant is exact
    assert errs[True] < errs[False]
