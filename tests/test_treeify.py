"""find_mlps + treeify_ on real HF architectures built from tiny local configs."""
import copy

import pytest
import torch
from torch import nn

from dynsparse import TreeConfig, TreeFF, find_mlps, treeify_
from hf_tiny import tiny_bert, tiny_detr, tiny_gpt2, tiny_llama, tiny_opt, tokens

BUILDERS = {"gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert, "llama": tiny_llama, "detr": tiny_detr}
EXPECTED = {  # (number of blocks, kind, d_ff)
    "gpt2": (2, "module", 64),
    "opt": (2, "inline", 40),
    "bert": (2, "split", 40),
    "llama": (2, "module", 40),
    "detr": (4, "module", 32),
}


def _run(name, model):
    if name == "detr":
        return model(pixel_values=torch.randn(1, 3, 32, 32)).logits
    out = model(tokens())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class _SameMLP(nn.Module):
    """The block's own layers recomputed in one module: replacing with it must change nothing."""

    def __init__(self, block):
        super().__init__()
        self.fc1, self.fc2, self.act = block.fc1, block.fc2, block.act
        self.up = None
        if block.gated:
            self.gate, self.up = block.owner.gate_proj, block.owner.up_proj

    def forward(self, x):
        if self.up is not None:
            return self.fc2(self.act(self.gate(x)) * self.up(x))
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("name", BUILDERS)
def test_find_mlps_sees_each_architecture(name):
    blocks = find_mlps(BUILDERS[name]())
    count, kind, d_ff = EXPECTED[name]
    assert len(blocks) == count
    assert {b.kind for b in blocks.values()} == {kind}
    assert {b.d_ff for b in blocks.values()} == {d_ff} and {b.d_model for b in blocks.values()} == {16}
    w1, _, w2, _ = next(iter(blocks.values())).linear_weights()
    assert w1.shape == (d_ff, 16) and w2.shape == (16, d_ff)


@pytest.mark.parametrize("name", BUILDERS)
def test_replace_is_faithful(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    with torch.no_grad():
        torch.manual_seed(1)
        before = _run(name, model)
        for block in find_mlps(model).values():
            block.replace(_SameMLP(block))
        torch.manual_seed(1)
        after = _run(name, model)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("position", ["node", "path"])
def test_treeify_replaces_and_trains(name, position):
    model = BUILDERS[name]()
    names = treeify_(model, TreeConfig(depth=3, trees=2, act_position=position))
    trees = [m for m in model.modules() if isinstance(m, TreeFF)]
    assert len(trees) == len(names) == EXPECTED[name][0]
    assert all(t.d_model == 16 and t.depth == 3 and t.trees == 2 for t in trees)
    out = _run(name, model)
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(t.w_in.grad is not None and t.w_in.grad.abs().sum() > 0 for t in trees)
    assert not find_mlps(model)  # nothing left to convert


def test_filter_fn_chooses_blocks():
    model = tiny_detr()
    names = treeify_(model, TreeConfig(depth=2), filter_fn=lambda m, fqn: ".encoder." in f".{fqn}.")
    assert names == ["model.encoder.layers.0.mlp", "model.encoder.layers.1.mlp"]
    assert len(find_mlps(model)) == 2  # decoder blocks untouched


def test_treeify_follows_device_and_dtype():
    model = tiny_gpt2().to(torch.float64)
    treeify_(model, TreeConfig(depth=1))
    assert all(t.w_in.dtype == torch.float64 for t in model.modules() if isinstance(t, TreeFF))


def test_treeify_bad_input():
    with pytest.raises(ValueError, match="no MLP blocks"):
        treeify_(nn.Sequential(nn.Linear(3, 3)), TreeConfig(depth=2))
    with pytest.raises(TypeError, match="TreeConfig"):
        treeify_(tiny_gpt2(), {"depth": 2})
    with pytest.raises(ValueError, match="depth"):
        treeify_(tiny_gpt2(), TreeConfig(depth=-1))
    model = tiny_gpt2()
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        treeify_(model, TreeConfig(depth=2, activation="nope"))
    assert model.state_dict().keys() == snapshot.keys()  # nothing half-converted
