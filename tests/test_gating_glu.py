"""Gated (Llama-style) MLP blocks through the recorder, SIBS and MGS: act(gate_proj(x)) * up_proj(x)."""
import pytest
import torch
import torch.nn.functional as F
from gating_helpers import TEST, calib, out
from transformers import LlamaConfig, LlamaModel

from dynsparse import find_mlps
from dynsparse.gating import (
    GatedMLP,
    GateSet,
    MGSConfig,
    SIBSConfig,
    SlicedMLP,
    fit_gates,
    load_gates,
    sparsify_,
)
from dynsparse.gating.record import record_activations


def tiny_llama(act="silu"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, hidden_act=act,
                      mlp_bias=act == "relu")  # one variant with biases, so bg and b1 are exercised too
    return LlamaModel(cfg).eval()


def block_inputs(model, batches):
    """Each MLP block's input rows over ``batches`` (captured with pre-hooks on the dense model)."""
    rows = {}
    handles = [b.owner.register_forward_pre_hook(lambda m, a, n=n: rows.setdefault(n, []).append(a[0].flatten(0, 1)))
               for n, b in find_mlps(model).items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def test_blocks_are_found_gated_and_route_by_the_gate_projection():
    m = tiny_llama()
    blocks = find_mlps(m)
    assert len(blocks) == 2
    for b in blocks.values():
        assert b.gated and b.fc1 is b.owner.up_proj and b.gate_proj is b.owner.gate_proj
        assert b.routing_weights()[0] is b.owner.gate_proj.weight


def test_recorded_statistics_are_those_of_the_gated_product():
    m = tiny_llama()
    batches = calib(3)
    stats = record_activations(m, batches)
    for name, x in block_inputs(m, batches).items():
        blk = m.layers[int(name.split(".")[1])].mlp
        gate = F.silu(blk.gate_proj(x))
        a = gate * blk.up_proj(x)
        s = stats[name]
        assert s.n_tokens == x.shape[0] and s.activation == "silu"
        assert torch.equal(s.fire_count, (gate > 0).sum(0))  # active = the gate's positive branch
        assert torch.allclose(s.act_sum, a.double().sum(0), atol=1e-4)
        assert torch.allclose(s.inactive_sum, torch.where(gate > 0, 0.0, a).double().sum(0), atol=1e-4)


def test_sibs_keeps_the_dense_function_at_zero_sparsity_and_slices_all_three_projections():
    m = tiny_llama()
    ref = out(m)
    sparsify_(m, SIBSConfig(target_sparsity=0.0), calib=calib(2))
    assert torch.allclose(out(m), ref, atol=1e-5)
    m = tiny_llama()
    gates = sparsify_(m, SIBSConfig(target_sparsity=0.5), calib=calib(4))
    sliced = m.layers[0].mlp
    assert isinstance(sliced, SlicedMLP) and sliced.gate_proj.weight.shape == (64, 32) == sliced.fc1.weight.shape
    # the sliced block equals the dense block with the removed neurons replaced by their mean output
    dense = tiny_llama().layers[0].mlp
    kept = gates.tensors["layers.0.mlp"]["kept"]
    x = torch.randn(5, 32)
    with torch.no_grad():
        a = F.silu(dense.gate_proj(x)) * dense.up_proj(x)
        removed = torch.ones(128, dtype=torch.bool)
        removed[kept] = False
        expected = dense.down_proj(torch.where(removed, 0.0, a)) + gates.tensors["layers.0.mlp"]["bias_shift"]
        assert torch.allclose(sliced(x), expected, atol=1e-5)


@pytest.mark.parametrize("gate", ["lowrank", "grouped"])
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_mgs_kernel_path_equals_reference_and_all_on_gates_are_exact(gate, act, tmp_path):
    m = tiny_llama(act)
    ref = out(m)
    gates = fit_gates(m, MGSConfig(gate=gate, group_size=8, steps=30, compensate=False, min_samples=32), calib())
    assert all(info["gated"] for info in gates.layers.values())
    for report in gates.report.values():
        assert report["mlp_flops_per_token"] == 6 * 32 * 128
    gates.save(tmp_path)
    load_gates(m, tmp_path)
    for layer in m.layers:
        mod = layer.mlp
        assert isinstance(mod, GatedMLP) and mod.wg is not None
        x = torch.randn(40, 32)
        with torch.no_grad():
            torch.testing.assert_close(mod(x), mod.forward_reference(x), atol=1e-5, rtol=1e-4)
        mod.threshold.fill_(-float("inf"))  # every neuron on: the dense gated block, whatever the gate says
    torch.testing.assert_close(out(m), ref, atol=1e-4, rtol=1e-4)


def test_relu_gated_block_with_full_recall_is_exact_where_the_gate_covers_the_active_set():
    m = tiny_llama("relu")
    gates = fit_gates(m, MGSConfig(target_recall=1.0, steps=50, min_samples=32), calib())
    name = "layers.0.mlp"
    dense = tiny_llama("relu").layers[0].mlp
    from dynsparse.gating.mgs import build_gated

    mod = build_gated(find_mlps(tiny_llama("relu"))[name], gates.tensors[name], "relu")
    x = block_inputs(tiny_llama("relu"), [TEST])[name]
    with torch.no_grad():
        covered = ~((F.relu(dense.gate_proj(x)) > 0) & ~mod.gate_mask(x)).any(1)  # rows the gate fully covers
        assert covered.any()
        torch.testing.assert_close(mod(x)[covered], dense(x)[covered], atol=1e-5, rtol=1e-4)


def test_gate_file_for_a_plain_mlp_is_refused_on_a_gated_one(tmp_path):
    m = tiny_llama()
    gates = fit_gates(m, MGSConfig(steps=5, min_samples=32), calib())
    gates.layers["layers.0.mlp"]["gated"] = False
    gates.save(tmp_path)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="gated"):
        load_gates(fresh, tmp_path)
    assert not isinstance(fresh.layers[1].mlp, GatedMLP)  # nothing installed
    assert GateSet.load(tmp_path).layers["layers.1.mlp"]["gated"] is True
