"""Magnitude activity (contribution, CATS) through the recorder, threshold calibration, SIBS and MGS."""
import math

import pytest
import torch
from gating_helpers import calib, tiny_gpt2
from test_gating_glu import block_inputs, tiny_llama

from dynsparse import find_mlps
from dynsparse.gating import MGSConfig, SIBSConfig, derive_stats, fit_gates, record_activations
from dynsparse.gating.activity import BlockScorer, threshold_for, topk_mask
from dynsparse.gating.gate_training import GateJob, train_gates
from dynsparse.gating.mgs import _prepare, train_gate


def direct_scores(model, batches):
    """{block: (h, contribution, cats)} computed from the dense blocks' captured inputs."""
    out = {}
    for name, x in block_inputs(model, batches).items():
        blk = find_mlps(model)[name]
        with torch.no_grad():
            if blk.gated:
                gate = blk.act(blk.gate_proj(x))
                h = gate * blk.fc1(x)
            else:
                gate = h = blk.act(blk.fc1(x))
            w2 = blk.linear_weights()[2]
            out[name] = (h, h.abs() * w2.norm(dim=0), gate.abs())
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_scores_are_the_definitions(make):
    m = make()
    batches = calib(2)
    for name, (h, contribution, cats) in direct_scores(m, batches).items():
        scorer = BlockScorer(find_mlps(m)[name])
        x = block_inputs(m, batches)[name]
        h2, gate = scorer.hidden(x)
        torch.testing.assert_close(h2, h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scorer.scores("contribution", h2, gate), contribution, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scorer.scores("cats", h2, gate), cats, atol=1e-5, rtol=1e-5)


def test_threshold_switches_off_the_target_share():
    scores = torch.rand(300, 40, generator=torch.Generator().manual_seed(0))
    for target in (0.0, 0.3, 0.5, 0.9):
        t = threshold_for(scores, target)
        assert math.isfinite(t)
        assert (scores <= t).sum().item() == int(target * scores.numel())
    mask = topk_mask(scores, 7)
    assert (mask.sum(1) == 7).all()
    assert (scores[mask].reshape(300, 7).min(1).values >= scores.masked_fill(mask, -1).max(1).values).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("criterion", ["contribution", "cats"])
def test_recorded_statistics_under_a_magnitude_activity(make, criterion):
    m = make()
    batches = calib(3)
    stats = record_activations(m, batches, activity=criterion, target_sparsity=0.5, progress=False)
    for name, (h, contribution, cats) in direct_scores(m, batches).items():
        s = stats[name]
        scores = contribution if criterion == "contribution" else cats
        assert s.activity == criterion and s.target_sparsity == 0.5 and s.n_tokens == h.shape[0]
        assert s.threshold == pytest.approx(scores.flatten().kthvalue(scores.numel() // 2).values.item(), rel=1e-5)
        active = scores > s.threshold
        assert abs(s.sparsity - 0.5) < 1e-3
        assert torch.equal(s.samples_active, active) and torch.equal(s.fire_count, active.sum(0))
        torch.testing.assert_close(s.mean_inactive_activation.float(),
                                   torch.where(active, 0.0, h).sum(0) / (~active).sum(0).clamp_min(1),
                                   atol=1e-5, rtol=1e-4)
        assert s.batch_union == pytest.approx(sum(active[i * 64:(i + 1) * 64].any(0).float().mean().item()
                                                  for i in range(3)) / 3)


def test_derived_targets_equal_separate_recordings():
    m = tiny_llama()
    rows = record_activations(m, calib(3), max_samples=10**6, progress=False)
    both = derive_stats(find_mlps(m), rows, "contribution", [0.3, 0.7], progress=False)
    for t in (0.3, 0.7):
        alone = record_activations(m, calib(3), activity="contribution", target_sparsity=t, progress=False)
        for name, s in alone.items():
            assert torch.equal(both[t][name].samples_active, s.samples_active)
            assert both[t][name].threshold == s.threshold


def test_sibs_removes_the_least_often_contributing_neurons():
    m = tiny_llama()
    stats = record_activations(m, calib(3), activity="contribution", target_sparsity=0.5, progress=False)
    gates = fit_gates(m, SIBSConfig(target_sparsity=0.5, activity="contribution"), stats=stats, progress=False)
    for name, ts in gates.tensors.items():
        f = stats[name].firing_frequency
        removed = torch.ones(128, dtype=torch.bool)
        removed[ts["kept"]] = False
        assert f[ts["kept"]].min() >= f[removed].max()
        assert gates.report[name]["activity"] == "contribution"
    # sign statistics handed to a magnitude config are re-derived from their rows, not misused
    rows = record_activations(m, calib(3), max_samples=10**6, progress=False)
    again = fit_gates(m, SIBSConfig(target_sparsity=0.5, activity="contribution"), stats=rows, progress=False)
    for name in gates.tensors:
        assert torch.equal(again.tensors[name]["kept"], gates.tensors[name]["kept"])


def test_mgs_trains_on_contribution_labels_and_is_exact_at_zero_sparsity():
    from gating_helpers import TEST

    m = tiny_llama()
    with torch.no_grad():
        ref = m(**TEST).last_hidden_state
    gates = fit_gates(m, MGSConfig(target_sparsity=0.0, activity="contribution", steps=5, min_samples=32),
                      calib(), progress=False)
    from dynsparse.gating import apply_gates

    apply_gates(m, gates)
    with torch.no_grad():
        torch.testing.assert_close(m(**TEST).last_hidden_state, ref, atol=1e-4, rtol=1e-4)
    m = tiny_llama()
    stats = record_activations(m, calib(), activity="contribution", target_sparsity=0.5, progress=False)
    gates = fit_gates(m, MGSConfig(target_sparsity=0.5, activity="contribution", steps=40, min_samples=32),
                      stats=stats, progress=False)
    for name, r in gates.report.items():
        assert r["natural_density"] == pytest.approx(0.5, abs=0.03)  # held-out rows of the contribution labels
        assert r["gated_density"] == pytest.approx(0.5, abs=0.02)
        assert r["recall"] > 0.5  # better than a coin at the same density


@pytest.mark.parametrize("gate", ["lowrank", "grouped"])
def test_batched_gate_training_equals_one_layer_at_a_time(gate):
    m = tiny_llama()
    stats = record_activations(m, calib(), activity="contribution", target_sparsity=0.5, progress=False)
    cfg = MGSConfig(gate=gate, group_size=8, target_sparsity=0.5, activity="contribution", steps=25, min_samples=32,
                    reorder=False)
    blocks = find_mlps(m)
    jobs, alone = [], {}
    for name, block in blocks.items():
        g, x, active, hold, train, labels, pw = _prepare(block, stats[name], cfg, None)
        jobs.append(GateJob(name, g, x, labels, train, pw))
        alone[name] = train_gate(block, stats[name], cfg)[0]
    train_gates(jobs, cfg.steps, cfg.lr, cfg.batch_size, cfg.seed, progress=False)
    for job in jobs:
        for (k, v), (k2, v2) in zip(job.gate.state_dict().items(), alone[job.name].state_dict().items()):
            torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-4)


def test_bad_activity_inputs_are_named():
    m = tiny_llama()
    with pytest.raises(ValueError, match="activity must be one of"):
        record_activations(m, calib(1), activity="magnitude")
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"target_sparsity must be a number in \[0, 1\)"):
            record_activations(m, calib(1), activity="contribution", target_sparsity=bad)
    with pytest.raises(ValueError, match="needs target_sparsity"):
        record_activations(m, calib(1), activity="cats")
    with pytest.raises(ValueError, match="has no threshold"):
        record_activations(m, calib(1), target_sparsity=0.5)
    with pytest.raises(ValueError, match="needs activity_sparsity"):
        SIBSConfig(threshold=0.2, activity="contribution")
    with pytest.raises(ValueError, match="needs activity_sparsity"):
        MGSConfig(target_recall=0.9, activity="cats")
    with pytest.raises(ValueError, match=r"activity_sparsity must be a number in \[0, 1\)"):
        MGSConfig(target_sparsity=0.5, activity="cats", activity_sparsity=1.0)
    with pytest.raises(ValueError, match="activity must be one of"):
        SIBSConfig(target_sparsity=0.5, activity="gate")


@pytest.mark.parametrize("n,d,d_ff,r", [(200, 32, 128, 8), (50, 64, 256, 16), (400, 16, 48, 16)])
def test_lowrank_init_spans_the_top_singular_subspace_of_the_pre_activations(n, d, d_ff, r):
    # the d x d route gives the same subspace as the eigenvectors of the (d_ff x d_ff) Gram matrix
    from dynsparse.gating.mgs import _top_right_singular

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)
    w = torch.randn(d_ff, d, generator=g)
    v = _top_right_singular(x, w, r)
    z = x @ w.t()
    ref = torch.linalg.eigh((z.t() @ z).double()).eigenvectors[:, -r:].float()
    torch.testing.assert_close(v @ v.t(), ref @ ref.t(), atol=1e-4, rtol=0)  # ref: a float32 Gram matrix
    torch.testing.assert_close(v.t() @ v, torch.eye(r), atol=1e-5, rtol=0)
