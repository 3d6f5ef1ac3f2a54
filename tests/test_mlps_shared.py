"""find_mlps on a block that is registered under two names: replacing it replaces every reference."""
import torch
from torch import nn

from dynsparse.mlps import find_mlps


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_a_shared_block_is_replaced_under_every_name():
    shared = _MLP()
    model = nn.Module()
    model.a, model.b = nn.Sequential(shared), nn.Sequential(shared)
    blocks = find_mlps(model)
    assert list(blocks) == ["a.0"]  # one block (named_modules lists a shared module once)
    new = nn.Linear(4, 4)
    blocks["a.0"].replace(new)
    assert model.a[0] is new and model.b[0] is new
    x = torch.randn(2, 4)
    assert torch.equal(model.b(x), new(x))


class _NormMLP(nn.Module):  # fc1 -> act -> LayerNorm -> fc2, like timm's NormMlp
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.norm, self.fc2 = nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


def test_a_block_with_a_norm_inside_is_not_taken_for_an_mlp():
    """Replacing it either way would change the function (the norm would wrap the new block), so it is
    left alone; treeify_ then names the model as having no replaceable MLP."""
    import pytest

    from dynsparse.tree import TreeConfig, treeify_

    model = nn.Sequential(_NormMLP())
    assert find_mlps(model) == {}
    with pytest.raises(ValueError, match="no MLP blocks"):
        treeify_(model, TreeConfig(depth=1))
