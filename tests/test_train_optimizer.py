"""Optimizer groups: the FF blocks' own learning-rate multiplier and weight decay, applied by the loop."""
import pytest
import torch

from dynsparse.cli import main
from dynsparse.lm import DynSparseLMForCausalLM
from dynsparse.train import TrainConfig, train
from dynsparse.train.loop import make_optimizer

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(300))
SMALL = dict(ff="tree", d_model=32, n_layer=2, n_head=2, depth=3, trees=2, vocab_size=300, seq_len=16, batch_size=4)


def model_and_cfg(**kw):
    cfg = TrainConfig.build("tiny", **{**SMALL, **kw})
    return DynSparseLMForCausalLM(cfg.model_config(300)), cfg


def test_default_groups_are_the_plain_decay_split():
    model, cfg = model_and_cfg()
    groups = make_optimizer(model, cfg).param_groups
    assert len(groups) == 2 and all("lr_scale" not in g for g in groups)
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 0.0]


def test_tree_tables_get_their_own_groups():
    model, cfg = model_and_cfg(ff_lr_scale=4.0, ff_weight_decay=0.0)
    groups = make_optimizer(model, cfg).param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    layers = model.tree_layers().values()
    tables = {id(p) for l in layers for p in (l.w_in, l.w_out)}
    biases = {id(l.b_in) for l in layers}
    tree_groups = [g for g in groups if g.get("lr_scale") == 4.0]
    assert {id(p) for g in tree_groups for p in g["params"]} == tables | biases
    assert all(g["weight_decay"] == 0.0 for g in tree_groups)
    # ff_weight_decay alone keeps lr_scale 1 but still separates the tables
    model, cfg = model_and_cfg(ff_weight_decay=0.5)
    groups = make_optimizer(model, cfg).param_groups
    tables = {id(p) for l in model.tree_layers().values() for p in (l.w_in, l.w_out)}
    table_group = next(g for g in groups if {id(p) for p in g["params"]} == tables)
    assert table_group["weight_decay"] == 0.5 and table_group["lr_scale"] == 1.0


def test_dense_ff_weights_get_the_same_treatment():
    model, cfg = model_and_cfg(ff="dense", ff_lr_scale=3.0)
    groups = make_optimizer(model, cfg).param_groups
    ff = [g for g in groups if g.get("lr_scale") == 3.0]
    mlps = [b.mlp for b in model.transformer.h]
    assert {id(p) for p in ff[0]["params"]} == {id(m.fc1.weight) for m in mlps} | {id(m.fc2.weight) for m in mlps}
    assert {id(p) for p in ff[1]["params"]} == {id(m.fc1.bias) for m in mlps} | {id(m.fc2.bias) for m in mlps}
    assert ff[0]["weight_decay"] == cfg.weight_decay and ff[1]["weight_decay"] == 0.0


def test_loop_scales_the_tree_learning_rate(tmp_path):
    """A tiny ff_lr_scale freezes the tree tables in practice while the rest of the model trains."""
    (tmp_path / "c.txt").write_text(CORPUS)
    kw = dict(SMALL, data=str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "cache"), max_steps=3, warmup_steps=1,
              eval_every=3, eval_batches=1, telemetry=False, weight_decay=0.0)
    cfg = TrainConfig.build("tiny", ff_lr_scale=1e-6, **kw)
    train(cfg, tmp_path / "run", progress=False)
    torch.manual_seed(cfg.seed)
    init = DynSparseLMForCausalLM(cfg.model_config(300)).state_dict()
    final = DynSparseLMForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    tree_keys = [k for k in init if k.endswith((".w_in", ".w_out", ".b_in"))]
    assert tree_keys and all(torch.allclose(init[k], final[k], atol=1e-7) for k in tree_keys)
    moved = [k for k in init if k not in tree_keys and not k.endswith("leaf_visits") and not torch.equal(init[k], final[k])]
    assert "transformer.h.0.attn.c_attn.weight" in moved


@pytest.mark.parametrize("flag, value", [("--ff-lr-scale", "0"), ("--ff-weight-decay", "-1")])
def test_cli_rejects_bad_tree_optimizer_flags(flag, value, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), flag, value]) == 2
    assert flag.lstrip("-").replace("-", "_") in capsys.readouterr().err
