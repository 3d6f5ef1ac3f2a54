"""The oracle and CATS baselines compute their definitions; every sparsified MLP module reports its
measured work through the sparse-FF protocol."""
import pytest
import torch
import torch.nn.functional as F
from gating_helpers import TEST, calib, tiny_gpt2
from test_gating_glu import tiny_llama

from dynsparse import find_mlps
from dynsparse.gating import (
    CATSConfig,
    CATSMLP,
    GatedMLP,
    GateSet,
    MGSConfig,
    OracleMLP,
    ReLUSkipMLP,
    SIBSConfig,
    SlicedMLP,
    apply_gates,
    cats_mlp,
    fit_gates,
    load_gates,
    oracle_mlp,
    record_activations,
)
from dynsparse.gating.activity import topk_mask
from dynsparse.sparse_ff import SparseFF, dense_ff_flops


def dense_parts(block, x):
    with torch.no_grad():
        gate = block.act(block.gate_proj(x)) if block.gated else block.act(block.fc1(x))
        h = gate * block.fc1(x) if block.gated else gate
    return h, gate


def test_oracle_keeps_each_tokens_top_contributions():
    m = tiny_llama()
    block = find_mlps(m)["layers.0.mlp"]
    x = torch.randn(30, 32)
    h, gate = dense_parts(block, x)
    w2 = block.fc2.weight
    for target in (0.0, 0.3, 0.7):
        mod = oracle_mlp(block, "silu", "contribution", target)
        keep = 128 - int(target * 128)
        mask = topk_mask(h.abs() * w2.norm(dim=0), keep)
        with torch.no_grad():
            torch.testing.assert_close(mod(x), block.fc2(h * mask), atol=1e-5, rtol=1e-4)
            if target == 0:
                torch.testing.assert_close(mod(x), block.owner(x), atol=1e-5, rtol=1e-4)
    cats = oracle_mlp(block, "silu", "cats", 0.5)
    with torch.no_grad():
        torch.testing.assert_close(cats(x), block.fc2(h * topk_mask(gate.abs(), 64)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the layer's calibrated threshold"):
        oracle_mlp(block, "silu", "contribution", 0.5, selection="threshold")
    with pytest.raises(ValueError, match="target_sparsity must be"):
        oracle_mlp(block, "silu", "contribution", 1.0)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_cats_sparse_path_equals_its_definition(backend, compensate, make):
    m = make()
    name, block = next(iter(find_mlps(m).items()))
    x = torch.randn(25, 32)
    h, gate = dense_parts(block, x)
    thr = gate.abs().flatten().kthvalue(gate.numel() // 2).values.item()
    comp = 0.01 * torch.randn(128) if compensate else None
    act = "silu" if make is tiny_llama else "gelu"
    mod = cats_mlp(block, act, thr, comp, backend=backend)
    mask = gate.abs() > thr
    fill = comp if comp is not None else torch.zeros(128)
    with torch.no_grad():
        expected = block.fc2(torch.where(mask, h, fill))
        torch.testing.assert_close(mod.forward_reference(x), expected, atol=1e-5, rtol=1e-4)
        if make is tiny_llama:  # the ops know exact GELU only; GPT-2's is the tanh form
            torch.testing.assert_close(mod(x), expected, atol=1e-4, rtol=1e-4)
    # the same mask as the per-layer-threshold oracle on the CATS criterion
    oracle = oracle_mlp(block, act, "cats", 0.5, selection="threshold", threshold=thr)
    assert torch.equal(oracle.mask(x)[1], mask)


def test_cats_method_fits_saves_and_refuses_plain_mlps(tmp_path):
    m = tiny_llama()
    stats = record_activations(m, calib(3), activity="cats", target_sparsity=0.4, progress=False)
    gates = fit_gates(m, CATSConfig(target_sparsity=0.4, compensate=True), calib(3), progress=False)
    for name, ts in gates.tensors.items():
        assert ts["threshold"].item() == pytest.approx(stats[name].threshold)
        torch.testing.assert_close(ts["compensation"], stats[name].mean_inactive_activation.float())
    gates.save(tmp_path)
    fresh = tiny_llama()
    load_gates(fresh, tmp_path, backend="reference")
    assert isinstance(fresh.layers[0].mlp, CATSMLP) and GateSet.load(tmp_path).method == "cats"
    apply_gates(m, gates, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**TEST).last_hidden_state, m(**TEST).last_hidden_state)
    with pytest.raises(ValueError, match="plain MLP"):
        fit_gates(tiny_gpt2(), CATSConfig(target_sparsity=0.5), calib(2))
    with pytest.raises(ValueError, match=r"target_sparsity must be a number in \[0, 1\)"):
        CATSConfig(target_sparsity=1.5)


def test_cats_at_zero_sparsity_is_the_dense_model():
    m = tiny_llama()
    with torch.no_grad():
        ref = m(**TEST).last_hidden_state
    fit = fit_gates(m, CATSConfig(target_sparsity=0.0), calib(2), progress=False)
    apply_gates(m, fit)
    with torch.no_grad():
        torch.testing.assert_close(m(**TEST).last_hidden_state, ref, atol=1e-5, rtol=1e-4)


def _modules(m):
    return [mod for mod in m.modules() if isinstance(mod, SparseFF)]


def test_every_module_reports_measured_usage():
    torch.manual_seed(0)
    x = torch.randn(40, 32)
    m = tiny_llama()
    block = find_mlps(m)["layers.0.mlp"]
    d, d_ff, per_neuron = 32, 128, 2 * (2 * 32 + 32)
    # SIBS
    sib = fit_gates(m, SIBSConfig(target_sparsity=0.25), calib(2), progress=False)
    mgs = fit_gates(m, MGSConfig(target_sparsity=0.5, activity="contribution", steps=5, min_samples=32), calib(),
                    progress=False)
    cats = fit_gates(m, CATSConfig(target_sparsity=0.5), calib(2), progress=False)
    oracle = oracle_mlp(block, "silu", "contribution", 0.75)
    mods = {}
    for label, gates in (("sibs", sib), ("mgs", mgs), ("cats", cats)):
        fresh = tiny_llama()
        apply_gates(fresh, gates, backend="numba")
        mods[label] = fresh.layers[0].mlp
    mods["oracle"] = oracle
    for label, mod in mods.items():
        assert isinstance(mod, SparseFF), label
        with torch.no_grad():
            mod(x)
        assert mod.measured_usage().tokens == 0, f"{label} counted without tracking"
        mod.reset_usage()
        mod.track_usage(True)
        with torch.no_grad():
            mod(x.reshape(4, 10, 32))
        u = mod.measured_usage()
        assert u.tokens == 40, label
        if label == "sibs":
            assert isinstance(mod, SlicedMLP)
            assert u.active_fraction == pytest.approx(0.75) and u.flops_per_token == 96 * per_neuron
            assert mod.flops_per_token == dense_ff_flops(d, 96, gated=True)
        elif label == "mgs":
            assert isinstance(mod, GatedMLP)
            assert u.active_fraction == pytest.approx(mod.last_density)
            assert u.flops_per_token == pytest.approx(mod.gate.flops_per_token + mod.last_density * d_ff * per_neuron)
        elif label == "cats":
            assert isinstance(mod, CATSMLP)
            with torch.no_grad():
                nnz = mod.gate_mask(x).sum().item()
            assert u.active_fraction == pytest.approx(nnz / (40 * d_ff))
            assert u.flops_per_token == pytest.approx(2 * d * d_ff + nnz / 40 * (per_neuron - 2 * d))  # gate row reused
        else:
            assert isinstance(mod, OracleMLP)
            assert u.active_fraction == pytest.approx(0.25) and u.flops_per_token == d_ff * per_neuron
        mod.reset_usage()
        assert mod.measured_usage().tokens == 0
    w1, b1, w2, b2 = torch.randn(64, 16), torch.randn(64), torch.randn(16, 64), torch.randn(16)
    skip = ReLUSkipMLP(w1, b1, w2, b2).track_usage(True)
    xs = torch.randn(9, 16)
    with torch.no_grad():
        skip(xs)
    nnz = (F.linear(xs, w1, b1) > 0).sum().item()
    u = skip.measured_usage()
    assert u.tokens == 9 and u.active_fraction == pytest.approx(nnz / (9 * 64))
    assert u.flops_per_token == pytest.approx(2 * 16 * 64 + nnz / 9 * 2 * 16)


def test_evaluation_reports_the_measured_usage():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dynsparse.eval.divergence import compare_models, dense_reference, evaluate_against

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    dense, sparse = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    sparse.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 60, (400,), generator=torch.Generator().manual_seed(3)).numpy()
    ref = dense_reference(dense, tokens, 16, batch_size=4, max_windows=12)
    same = evaluate_against(dense, ref)
    assert same["kl_to_dense"] == pytest.approx(0, abs=1e-6) and same["perplexity_increase"] == pytest.approx(0, abs=1e-6)
    assert same["ff_active_fraction"] == 1.0  # a dense model's MLPs count at full cost (they were NaN)
    gates = fit_gates(sparse, CATSConfig(target_sparsity=0.5), [{"input_ids": torch.from_numpy(tokens[:320]).reshape(20, 16)}],
                      progress=False)
    apply_gates(sparse, gates, backend="reference")
    r = evaluate_against(sparse, ref)
    mods = _modules(sparse)
    assert len(mods) == 2 and r["tokens"] == 12 * 16
    assert 0.3 < r["ff_active_fraction"] < 0.7 and r["kl_to_dense"] > 0
    # the KL is the definition, on the same windows
    x, y = ref.x, ref.y
    with torch.no_grad():
        p = F.log_softmax(dense(input_ids=x).logits, -1)
        q = F.log_softmax(sparse(input_ids=x).logits, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert r["kl_to_dense"] == pytest.approx(kl, rel=1e-4)
    assert r["loss"] == pytest.approx(F.nll_loss(q.reshape(-1, 60), y.reshape(-1)).item(), rel=1e-5)
    both = compare_models(sparse, dense, tokens, 16, batch_size=4, max_windows=12)
    for k in ("loss", "kl_to_dense", "ff_active_fraction", "dense_perplexity"):
        assert both[k] == pytest.approx(r[k], rel=1e-5)
    assert not any(mod.tracking for mod in mods)  # evaluation leaves tracking off
