"""Issue 14: the held-out routing probe (its recomputation and gradients against the masked reference) and
the auto-pruning study grid (reuse, refusals, report, pruning)."""
import json
import random

import numpy as np
import pytest
import torch

from dynsparse.cli import main
from dynsparse.dynamics.probe import _Accumulator, _path_forward, probe
from dynsparse.dynamics.study import VARIANTS, StudySpec
from dynsparse.ops.tree.reference import route_dense
from dynsparse.activations import fn as act_fn
from dynsparse.tree import TreeFF


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_path_forward_matches_masked_reference_and_its_gradients(variant):
    torch.manual_seed(0)
    layer = TreeFF(8, depth=3, trees=2, d_out=5, backend="reference", **VARIANTS[variant])
    x = torch.randn(40, 8)
    # the masked reference with the pre-activations as a leaf: dL/dz of every node on the path
    z_all = (torch.einsum("md,tnd->mtn", x, layer.w_in) + layer.b_in).detach().requires_grad_(True)
    paths = route_dense(z_all.detach(), layer.depth)
    mask = torch.zeros_like(z_all).scatter_(-1, paths, 1.0)
    act = act_fn(layer.activation)
    if layer.act_position == "node":
        y_ref = torch.einsum("mtn,tnd->md", mask * act(z_all), layer.w_out.detach())
    else:
        y_ref = act(torch.einsum("mtn,tnd->mtd", mask * z_all, layer.w_out.detach())).sum(1)
    target = torch.randn_like(y_ref)
    (g_ref,) = torch.autograd.grad(((y_ref - target) ** 2).sum(), z_all)

    y, z, path = _path_forward(layer, x)
    assert torch.equal(path, paths)
    torch.testing.assert_close(y, layer(x).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(((y - target) ** 2).sum(), z)
    torch.testing.assert_close(g, g_ref.gather(-1, paths), rtol=1e-5, atol=1e-6)


def test_accumulator_statistics_by_hand():
    layer = TreeFF(2, depth=1, trees=1)
    acc = _Accumulator(layer)
    # four tokens at the root: three turn right (z > 0), one left; gradients 2, 2, 2 on the right, 1 on the left
    path = torch.tensor([[[0, 2]], [[0, 2]], [[0, 2]], [[0, 1]]])
    z = torch.tensor([[[1.0, 0.5]], [[2.0, 0.5]], [[0.5, -1.0]], [[-1.0, 1.0]]])
    grad = torch.tensor([[[2.0, 0.0]], [[2.0, 0.0]], [[-2.0, 0.0]], [[1.0, 0.0]]])
    acc.add(z, path, grad)
    s = acc.summary()
    assert s["tokens"] == 4 and s["majority_share"] == pytest.approx(0.75)
    assert s["positive_share"] == pytest.approx(0.75)
    assert s["grad_ratio_rms"] == pytest.approx(2.0)  # RMS 2 on the positive side, 1 on the negative
    assert s["grad_ratio_total"] == pytest.approx(np.sqrt(12.0))
    assert s["dead_fraction"] == pytest.approx(0.0) and s["static_fraction"] == pytest.approx(0.0)
    assert s["majority_share_by_depth"] == [pytest.approx(0.75)]


def _tiny_lm(variant="node-gelu"):
    from dynsparse.lm import DynSparseLMConfig, DynSparseLMForCausalLM

    torch.manual_seed(0)
    cfg = DynSparseLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=16, ff="tree",
                            tree={"depth": 3, "trees": 2, **VARIANTS[variant]})
    return DynSparseLMForCausalLM(cfg)


def test_probe_matches_layer_telemetry_and_leaves_the_model_alone():
    from dynsparse.train.telemetry import set_tracking, tree_layers

    model = _tiny_lm()
    x = torch.randint(0, 50, (6, 12))
    y = torch.randint(0, 50, (6, 12))
    model.train()
    set_tracking(model, True)
    layers = tree_layers(model)
    before = {n: l.leaf_visits.clone() for n, l in layers.items()}
    result = probe(model, x, y, batch=3)
    assert model.training and all(l.tracking for l in layers.values())
    assert all(torch.equal(before[n], l.leaf_visits) for n, l in layers.items())
    assert all(p.grad is None for p in model.parameters())
    # the same rows through the model's own counters give the same routing statistics
    for l in layers.values():
        l.reset_usage()
    model.eval()
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for name, layer in layers.items():
        usage = layer.usage_stats()
        assert result[name]["tokens"] == x.numel()
        assert result[name]["dead_fraction"] == pytest.approx(usage.dead_fraction)
        assert result[name]["path_entropy"] == pytest.approx(usage.path_entropy)
        assert result[name]["recompute_max_abs_diff"] < 1e-5
    with pytest.raises(ValueError, match="fewer than one batch"):
        probe(model, x[:2], y[:2], batch=3)


def test_gradient_ratio_separates_node_gelu_from_gelu_after_the_path():
    """The mechanism, on an untrained model: GELU per node passes less gradient on its negative side."""
    x = torch.randint(0, 50, (8, 12))
    y = torch.randint(0, 50, (8, 12))
    node = probe(_tiny_lm("node-gelu"), x, y, batch=4)
    path = probe(_tiny_lm("path-gelu"), x, y, batch=4)
    ident = probe(_tiny_lm("node-identity"), x, y, batch=4)
    assert all(s["grad_ratio_rms"] > 1.3 for s in node.values())
    assert all(0.6 < s["grad_ratio_rms"] < 1.6 for s in path.values())
    assert all(0.6 < s["grad_ratio_rms"] < 1.6 for s in ident.values())
    relu = probe(_tiny_lm("node-relu"), x, y, batch=4)  # no gradient at all below zero
    assert all(s["grad_ratio_rms"] == float("inf") and s["negative_side_without_gradient"] == 1.0
               for s in relu.values())
    assert all(s["negative_side_without_gradient"] == 0.0 for s in node.values())


@pytest.mark.parametrize("over, match", [
    (dict(variants=("node-swish",)), "unknown variant"),
    (dict(lrs=(1e-3, 0.0)), "--lrs must be positive"),
    (dict(lrs=(float("nan"),)), "--lrs must be positive"),
    (dict(probe_windows=4, batch_size=8), "smaller than one batch"),
    (dict(max_steps=10, probe_every=20), "telemetry interval"),
    (dict(warmup_frac=0.9), "--warmup-frac"),
    (dict(seeds=()), "names nothing"),
    (dict(depths=(30,)), "--depths"),
])
def test_spec_refuses_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        StudySpec(**over)


def test_spec_cells_and_warmup():
    spec = StudySpec(variants=("node-gelu", "path-gelu"), lrs=(1e-3, 3e-3), seeds=(0, 1), max_steps=200,
                     probe_every=50, warmup_frac=0.1)
    assert len(spec.cells()) == 8
    cfg = spec.config("path-gelu", 3e-3, 7, 2, 1)
    assert (cfg.warmup_steps, cfg.lr, cfg.act_position, cfg.activation, cfg.seed) == (20, 3e-3, "path", "gelu", 1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    rng = random.Random(0)
    words = "the king queen lord speak night day love war crown sword heart fool death grace honour".split()
    (tmp / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "."
                                              for _ in range(12000)))
    return tmp


def _args(corpus, out, *extra):
    return ["study", "autoprune", "--quick", "--variants", "node-gelu,path-gelu", "--lrs", "1e-3,3e-3",
            "--max-steps", "10", "--data", str(corpus / "corpus.txt"), "--out", str(out), "--no-progress",
            "--threads", "1", *extra]


def test_study_grid_report_reuse_prune_and_refusals(corpus, capsys):
    out = corpus / "s"
    args = _args(corpus, out, "--final-seeds", "1", "--prune")
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Comparison at the best learning rate" in text and "Static conversion" in text
    data = json.loads((out / "study.json").read_text())
    assert data["best_lr"] in (1e-3, 3e-3)
    finals = [c for c in data["cells"] if c["lr"] == data["best_lr"]]
    assert {c["variant"] for c in finals} == {"node-gelu", "path-gelu"}
    assert all(c["seeds"] == [0, 1] and c["dead_fraction"]["n"] == 2 for c in finals)
    for p in data["prune"]:  # pruning keeps every held-out path in this small run: loss essentially unchanged
        assert p["params_after"] <= p["params_before"] and p["calib_loss_after"] == pytest.approx(
            p["calib_loss_before"], abs=1e-4)
    for name in ("study.md", "lr_sweep.png", "trajectories.png", "depth_profile.png"):
        assert (out / name).exists()
    run = out / "node-gelu-lr0.001-d7-t2-s0"
    probes = [json.loads(line) for line in (run / "probe.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [0, 5, 10]
    mtime = (run / "final" / "metrics.json").stat().st_mtime
    assert main(args) == 0  # finished cells are reused, not retrained
    assert (run / "final" / "metrics.json").stat().st_mtime == mtime
    capsys.readouterr()
    # another base configuration in the same folder: one line, nothing touched
    assert main(_args(corpus, out) + ["--warmup-frac", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "another study configuration" in err and "warmup_frac" in err and len(err.strip().splitlines()) == 1
    assert (run / "final" / "metrics.json").stat().st_mtime == mtime


def test_a_folder_filled_by_two_invocations_reports_both_with_whitened_variants(corpus, capsys):
    """Shapes of another grid added to a folder by a second invocation (whitened variants here): the report
    covers every finished cell and prune, one trajectory figure per shape, and pruning a whitened tree
    (its whitening folded into the pruned tables) keeps the loss."""
    out = corpus / "two"
    base = ["study", "autoprune", "--quick", "--lrs", "1e-3", "--max-steps", "10", "--data", str(corpus / "corpus.txt"),
            "--out", str(out), "--no-progress", "--threads", "1", "--prune"]
    assert main(base + ["--variants", "node-gelu,path-gelu", "--depths", "3", "--trees", "2"]) == 0
    assert main(base + ["--variants", "node-gelu+whiten,path-gelu+whiten", "--depths", "4", "--trees", "1"]) == 0
    capsys.readouterr()
    data = json.loads((out / "study.json").read_text())
    assert {(c["variant"], c["depth"]) for c in data["cells"]} == {
        ("node-gelu", 3), ("path-gelu", 3), ("node-gelu+whiten", 4), ("path-gelu+whiten", 4)}
    assert sorted(p["variant"] for p in data["prune"]) == ["node-gelu", "node-gelu+whiten", "path-gelu",
                                                            "path-gelu+whiten"]
    for p in data["prune"]:
        assert p["calib_loss_after"] == pytest.approx(p["calib_loss_before"], abs=1e-4)
    assert (out / "trajectories_d3_t2.png").exists() and (out / "trajectories_d4_t1.png").exists()
    assert "depth 3, 2 trees" in data["verdict"] and "depth 4, 1 tree, whiten" in data["verdict"]
    run = json.loads((out / "node-gelu+whiten-lr0.001-d4-t1-s0" / "config.json").read_text())
    assert run["whiten"] is True


@pytest.mark.parametrize("extra, match", [
    (["--variants", "node-swish"], "unknown variant"),
    (["--variants", "node-gelu+centre"], "unknown variant"),
    (["--lrs", "1e-3,-1e-3"], "--lrs must be positive"),
    (["--lrs", "fast"], "comma-separated list of floats"),
    (["--heldout-windows", "2"], "smaller than one batch"),
    (["--threads", "0"], "--threads"),
])
def test_cli_bad_input_is_one_line(corpus, tmp_path, capsys, extra, match):
    out = tmp_path / "s"
    assert main(_args(corpus, out) + extra) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_heldout_set_larger_than_the_validation_split_is_refused(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("the king speaks. " * 400)
    out = tmp_path / "s"
    assert main(["study", "autoprune", "--quick", "--variants", "node-gelu", "--max-steps", "10", "--data",
                 str(tmp_path / "small.txt"), "--heldout-windows", "4000", "--out", str(out), "--no-progress"]) == 2
    assert "lower --heldout-windows" in capsys.readouterr().err


def _input_summary(layer, x):
    """The accumulator's summary for one batch of layer inputs x (routing and gradients from x itself)."""
    acc = _Accumulator(layer)
    _, z, path = _path_forward(layer, x)
    acc.add(z, path, torch.zeros_like(z))
    acc.add_input(x)
    return acc.summary()


def test_input_anisotropy_identical_rows_and_centred_rows():
    torch.manual_seed(0)
    layer = TreeFF(8, depth=3, trees=2)
    row = torch.randn(1, 8)
    same = _input_summary(layer, row.expand(50, 8).contiguous())
    assert same["input_anisotropy"] == pytest.approx(1.0)
    assert same["offset_ratio"] == float("inf")  # no spread: every node sends every token one way
    assert same["dead_fraction"] > 0.5 and all(s in (0.0, 1.0) for s in same["root_positive_share"])
    # the weights' alignment with the one shared direction, by hand over the internal nodes
    w = layer.w_in.detach()[:, : 2**3 - 1].reshape(-1, 8)
    cos = (torch.nn.functional.cosine_similarity(w, row.expand_as(w), dim=1)).abs().mean()
    assert same["w_in_mean_cos"] == pytest.approx(float(cos), rel=1e-5)
    x = torch.randn(4000, 8)
    centred = _input_summary(layer, x - x.mean(0))
    assert centred["input_anisotropy"] < 1e-10
    assert centred["offset_ratio_mean_part"] < 1e-6  # the centred input puts no node off its boundary
    assert centred["dead_fraction"] == 0.0
    assert 7.0 < centred["input_effective_rank"] <= 8.0  # an isotropic spread over all 8 dimensions
    line = _input_summary(layer, torch.randn(500, 1) * torch.randn(1, 8) + torch.randn(1, 8))
    assert line["input_effective_rank"] == pytest.approx(1.0)  # tokens that differ along one direction only
    assert same["input_effective_rank"] != same["input_effective_rank"]  # no spread at all: undefined (NaN)


def test_offset_ratios_match_the_pre_activations_over_all_tokens():
    torch.manual_seed(1)
    layer = TreeFF(8, depth=2, trees=2)
    x = torch.randn(3000, 8) * 0.5 + torch.linspace(-1, 2, 8)  # a shared offset on top of the spread
    s = _input_summary(layer, x)
    xd = x.double()
    assert s["input_anisotropy"] == pytest.approx(float(xd.mean(0).square().sum() / xd.square().sum(1).mean()))
    assert 0.5 < s["input_anisotropy"] < 1.0
    internal = layer.w_in.detach()[:, :3].reshape(-1, 8).double()
    b = layer.b_in.detach()[:, :3].reshape(-1).double()
    z = xd @ internal.T + b  # every internal node over every token, not only those reaching it
    sd = z.std(0, unbiased=False)
    med = lambda t: float(np.median(t.numpy()))  # noqa: E731  (numpy's median: the mean of the middle two)
    assert s["offset_ratio"] == pytest.approx(med(z.mean(0).abs() / sd), rel=1e-6)
    assert s["offset_ratio_bias_part"] == pytest.approx(med(b.abs() / sd), rel=1e-6)
    assert s["offset_ratio_mean_part"] == pytest.approx(med((z.mean(0) - b).abs() / sd), rel=1e-6)
    roots = (xd @ layer.w_in.detach()[:, 0].double().T + layer.b_in.detach()[:, 0].double()) > 0
    assert s["root_positive_share"] == pytest.approx(roots.double().mean(0).tolist())


def test_probe_reports_the_tree_input_moments():
    """The probe's input statistics are those of the tree layer's own input (captured here by a hook)."""
    from dynsparse.train.telemetry import tree_layers

    model = _tiny_lm()
    x = torch.randint(0, 50, (6, 12))
    y = torch.randint(0, 50, (6, 12))
    seen = {}
    layers = tree_layers(model)
    handles = [l.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(
        a[0].detach().reshape(-1, 16))) for n, l in layers.items()]
    result = probe(model, x, y, batch=3)
    for h in handles:
        h.remove()
    for name, layer in layers.items():
        xs = torch.cat(seen[name]).double()
        expected = float(xs.mean(0).square().sum() / xs.square().sum(1).mean())
        assert result[name]["input_anisotropy"] == pytest.approx(expected, rel=1e-6)
        assert 0.0 <= result[name]["w_in_mean_cos"] <= 1.0
        assert len(result[name]["root_positive_share"]) == layer.trees
