"""The LM's tree w_out initialisation choice (tree_out_init) and that it survives save/load."""
import math

import pytest
import torch

from dynsparse.lm import DynSparseLMForCausalLM, preset_config


def tree_model(**kw):
    torch.manual_seed(0)
    cfg = preset_config("tiny", ff="tree", hidden_size=64, num_hidden_layers=2, tree={"depth": 4, "trees": 4},
                        vocab_size=100, **kw)
    return DynSparseLMForCausalLM(cfg)


def test_published_init_is_the_uniform_bound():
    layer = tree_model().transformer.h[0].mlp
    bound = 1 / math.sqrt(4 * 5)
    assert layer.w_out.abs().max() <= bound and layer.w_out.abs().max() > 0.9 * bound


def test_residual_init_matches_the_dense_fc2_scale(tmp_path):
    model = tree_model(tree_out_init="residual")
    w = model.transformer.h[1].mlp.w_out
    assert w.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    model.save_pretrained(tmp_path)
    loaded = DynSparseLMForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.tree_out_init == "residual"
    assert torch.equal(loaded.transformer.h[1].mlp.w_out, w)  # loading never re-initialises


def test_unknown_tree_out_init_is_rejected():
    with pytest.raises(ValueError, match="tree_out_init"):
        tree_model(tree_out_init="zeros")
