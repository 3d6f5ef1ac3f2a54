"""The LM: config checks, dense/tree forward, KV cache equality, HF save/load/generate round trips."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import dynsparse.lm as lm
from dynsparse import find_mlps
from dynsparse.tree import TreeFF


def tiny(**kw):
    base = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, tree={"depth": 3, "trees": 2})
    return lm.DynSparseLMConfig(**{**base, **kw})


@pytest.fixture(params=[("dense", "learned"), ("tree", "learned"), ("tree", "rope"), ("dense", "rope")])
def model(request):
    torch.manual_seed(0)
    ff, pos = request.param
    return lm.DynSparseLMForCausalLM(tiny(ff=ff, position_embedding=pos)).eval()


def test_ff_field_picks_the_block():
    dense = lm.DynSparseLMForCausalLM(tiny(ff="dense"))
    tree = lm.DynSparseLMForCausalLM(tiny(ff="tree"))
    assert len(find_mlps(dense)) == 2 and not dense.tree_layers()
    assert all(isinstance(b.mlp, TreeFF) for b in tree.transformer.h)
    assert set(tree.tree_layers()) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}
    assert tree.lm_head.weight is tree.transformer.wte.weight  # tied


def test_loss_matches_manual_cross_entropy(model):
    ids = torch.randint(0, 61, (2, 12))
    out = model(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


def test_causality(model):
    """Changing a later token never changes earlier logits."""
    ids = torch.randint(0, 61, (1, 10))
    other = ids.clone()
    other[0, 7] = (other[0, 7] + 1) % 61
    a, b = model(ids, use_cache=False).logits, model(other, use_cache=False).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_kv_cache_equals_full_forward(model):
    ids = torch.randint(0, 61, (2, 11))
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :6], use_cache=True)
    second = model(ids[:, 6:9], cache=first.cache)
    third = model(ids[:, 9:], cache=second.cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits, third.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_padding_mask_matches_unpadded(model):
    """Left padding with an attention mask gives the same logits as the unpadded sequence."""
    ids = torch.randint(1, 61, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    a = model(ids, use_cache=False).logits
    b = model(padded, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, 3:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_save_load_generate_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "dynsparse_lm"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is lm.DynSparseLMForCausalLM
    ids = torch.randint(0, 61, (2, 5))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    cached = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.shape == (2, 11) and torch.equal(cached, uncached)


def test_tree_usage_counts_survive_save(tmp_path):
    model = lm.DynSparseLMForCausalLM(tiny(ff="tree")).eval()
    for t in model.tree_layers().values():
        t.track_usage(True)
    model(torch.randint(0, 61, (2, 8)))
    visits = model.transformer.h[0].mlp.leaf_visits.clone()
    assert visits.sum() == 2 * 8 * 2  # tokens x trees
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.transformer.h[0].mlp.leaf_visits, visits)


def test_tree_cost_properties():
    cfg = tiny(ff="tree", tree={"depth": 7, "trees": 4})
    assert cfg.ff_active_fraction == pytest.approx(8 / 255)
    assert cfg.ff_flops_per_token == lm.DynSparseLMForCausalLM(cfg).transformer.h[0].mlp.flops_per_token
    assert tiny(ff="dense").ff_flops_per_token == 2 * 2 * 32 * 128


@pytest.mark.parametrize("name", sorted(lm.PRESETS))
def test_presets_build_configs(name):
    cfg = lm.preset_config(name)
    assert cfg.hidden_size % cfg.num_attention_heads == 0


def test_small_preset_is_about_20m_parameters():
    with torch.device("meta"):
        m = lm.DynSparseLMForCausalLM(lm.preset_config("small"))
    n = sum(p.numel() for p in m.parameters())
    assert 15e6 < n < 30e6


@pytest.mark.parametrize("kw,match", [
    (dict(ff="moe"), "ff must be one of"),
    (dict(hidden_size=30), "divisible"),
    (dict(position_embedding="alibi"), "position_embedding"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        lm.preset_config("huge")


def test_too_long_sequence():
    model = lm.DynSparseLMForCausalLM(tiny())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))
