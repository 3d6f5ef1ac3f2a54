"""Issue 14: the whitened tree input (TreeFF(whiten=True)): statistics of earlier batches only, the same
function on every backend, folded into the weights exactly, pruned, saved and reloaded, and in the study."""
import json

import pytest
import torch

from dynsparse.tree import TreeFF
from dynsparse.tree.prune import prune_static
from dynsparse.tree.whiten import InputWhitening


def _correlated(n, d, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    mix = 0.3 * torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)  # well conditioned: no eigenvalue floored
    return torch.randn(n, d, generator=g) @ mix + offset * torch.randn(d, generator=g)


def test_first_step_is_the_identity_then_the_previous_batch_is_whitened():
    w = InputWhitening(6).train()
    a, b = _correlated(400, 6, seed=1), _correlated(400, 6, seed=2)
    with torch.enable_grad():
        assert torch.equal(w(a), a)  # no statistics yet: the identity
        y = w(b)  # transformed with a's statistics, not its own
    ad = a.double()
    lam, vec = torch.linalg.eigh(torch.cov(ad.T, correction=0))
    a_map = (vec * lam.rsqrt()) @ vec.T
    torch.testing.assert_close(y.double(), (b.double() - ad.mean(0)) @ a_map, atol=1e-4, rtol=1e-4)
    assert int(w.updates) == 2
    # the stored map is now b's: it gives b zero mean and identity covariance
    wb = (b.double() - w.mean.double()) @ w.transform.double()
    torch.testing.assert_close(wb.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cov(wb.T, correction=0), torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)


def test_eval_and_no_grad_never_change_the_statistics():
    w = InputWhitening(4).train()
    with torch.enable_grad():
        w(_correlated(100, 4))
    state = {k: v.clone() for k, v in w.state_dict().items()}
    with torch.no_grad():
        w(_correlated(100, 4, seed=5))
    w.eval()
    with torch.enable_grad():
        w(_correlated(100, 4, seed=6))
    assert all(torch.equal(state[k], v) for k, v in w.state_dict().items())


def test_small_directions_are_floored_not_blown_up():
    w = InputWhitening(3, floor=0.01).train()
    x = torch.randn(500, 3) * torch.tensor([1.0, 1.0, 1e-6])  # one direction with no spread
    with torch.enable_grad():
        w(x)
    lam = torch.linalg.eigvalsh(w.transform.double())
    assert float(lam.max()) < 1.0 / (0.01 * 2 / 3) ** 0.5 * 1.01  # capped at floor x mean eigenvalue


@pytest.mark.parametrize("bad, match", [(dict(momentum=1.0), "momentum"), (dict(floor=0.0), "floor")])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        InputWhitening(4, **bad)


def _trained_whitened_layer(bias=True, act_position="node"):
    torch.manual_seed(0)
    layer = TreeFF(8, depth=3, trees=2, d_out=5, whiten=True, bias=bias, act_position=act_position).train()
    with torch.enable_grad():
        for seed in range(3):
            layer(_correlated(64, 8, seed=seed)).sum().backward()
    return layer.eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act_position", ["node", "path"])
def test_backends_agree_and_folding_keeps_the_function(bias, act_position):
    layer = _trained_whitened_layer(bias, act_position)
    assert int(layer.whitening.updates) == 3
    x = _correlated(50, 8, seed=9)
    with torch.no_grad():
        outs = {}
        for backend in ("reference", "torch", "numba"):
            layer.backend = backend
            outs[backend] = layer(x)
        layer.backend = "auto"
        before = layer(x)
    torch.testing.assert_close(outs["torch"], outs["reference"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["numba"], outs["reference"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, TreeFF(8, 3, 2, 5, bias=bias, act_position=act_position)(x), atol=1e-3)
    layer.fold_whitening_()
    assert layer.whitening is None and layer.b_in is not None
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_gradients_pass_through_the_whitening_on_every_training_backend():
    layer = _trained_whitened_layer()
    layer.train()
    x = _correlated(40, 8, seed=11)
    grads = {}
    for backend in ("reference", "numba"):
        layer.backend = backend
        xi = x.clone().requires_grad_(True)
        layer.zero_grad()
        with torch.no_grad():  # the same statistics for both backends
            stats = {k: v.clone() for k, v in layer.whitening.state_dict().items()}
        layer(xi).square().sum().backward()
        layer.whitening.load_state_dict(stats)
        grads[backend] = (xi.grad, layer.w_in.grad.clone())
    torch.testing.assert_close(grads["numba"][0], grads["reference"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["numba"][1], grads["reference"][1], rtol=1e-4, atol=1e-5)
    assert grads["reference"][0].abs().sum() > 0


def test_pruning_a_whitened_layer_keeps_its_function():
    layer = _trained_whitened_layer()
    x = _correlated(300, 8, seed=12)
    layer.track_usage(True)
    with torch.no_grad():
        y = layer(x)
    pruned = prune_static(layer)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), y, rtol=1e-4, atol=1e-5)


def test_a_whitened_lm_saves_and_reloads_to_the_same_logits(tmp_path):
    from dynsparse.lm import DynSparseLMConfig, DynSparseLMForCausalLM

    torch.manual_seed(0)
    cfg = DynSparseLMConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=16, ff="tree", tree={"depth": 3, "trees": 2, "whiten": True})
    model = DynSparseLMForCausalLM(cfg).train()
    ids = torch.randint(0, 40, (4, 12))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    model.save_pretrained(tmp_path)
    again = DynSparseLMForCausalLM.from_pretrained(tmp_path).eval()
    assert all(l.whitening is not None and int(l.whitening.updates) == 2
               for l in again.modules() if isinstance(l, TreeFF))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_study_variants_take_the_whiten_modifier():
    from dynsparse.dynamics.study import StudySpec, variant_settings
    from dynsparse.dynamics.study_report import variant_of

    spec = StudySpec(variants=("node-gelu+whiten", "path-gelu"), max_steps=100, probe_every=50)
    cfg = spec.config("node-gelu+whiten", 1e-3, 7, 2, 0)
    assert cfg.whiten and cfg.activation == "gelu" and cfg.act_position == "node"
    assert cfg.model_config(50).tree_config.whiten
    assert variant_of(cfg.to_dict()) == "node-gelu+whiten"
    assert variant_of(spec.config("path-gelu", 1e-3, 7, 2, 0).to_dict()) == "path-gelu"
    assert variant_settings("node-tanh+whiten") == dict(activation="tanh", act_position="node", whiten=True)
    for bad in ("node-gelu+centre", "node-gelu+whiten+whiten", "whiten"):
        with pytest.raises(ValueError, match="unknown variant"):
            StudySpec(variants=(bad,))


def test_runs_saved_before_the_whiten_field_still_resume():
    from dynsparse.train.config import TrainConfig, diff_configs

    new = TrainConfig(ff="tree").to_dict()
    old = {k: v for k, v in new.items() if k != "whiten"}
    assert diff_configs(old, new) == []
    assert diff_configs(old, {**new, "whiten": True}) == ["whiten"]
    for bad in (dict(ff="dense", whiten=True), dict(ff="tree", whiten=True, init_from="some/dir")):
        with pytest.raises(ValueError, match="whiten builds new tree blocks"):
            TrainConfig(**bad)


def test_train_whiten_flag_builds_whitened_trees_and_prune_folds_them(tmp_path):
    from cli_helpers import CORPUS, run_cli, train_argv

    from dynsparse.lm import DynSparseLMForCausalLM

    (tmp_path / "c.txt").write_text(CORPUS)
    run = tmp_path / "run"
    assert run_cli(train_argv(tmp_path / "c.txt", run, tmp_path / "cache") + ["--whiten"]).kind == "ok"
    assert json.loads((run / "config.json").read_text())["whiten"] is True
    model = DynSparseLMForCausalLM.from_pretrained(run / "final")
    trees = [m for m in model.modules() if isinstance(m, TreeFF)]
    assert trees and all(t.whitening is not None and int(t.whitening.updates) == 4 for t in trees)
    outcome = run_cli(["prune", str(run), "--out", str(tmp_path / "pruned")])
    assert outcome.kind == "ok", outcome.err
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["val_loss_after"] == pytest.approx(report["val_loss_before"], abs=1e-4)
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["tree"]["whiten"] is False


def test_a_whitened_layer_compiles_to_one_graph_for_inference():
    torch._dynamo.reset()
    layer = _trained_whitened_layer()
    x = _correlated(20, 8, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
