"""experiments/autoprune_collapse.py: the running-statistics input transforms put in front of tree layers."""
import importlib.util
from pathlib import Path

import pytest
import torch

from dynsparse.tree import TreeFF

_path = Path(__file__).resolve().parents[1] / "experiments" / "autoprune_collapse.py"
_spec = importlib.util.spec_from_file_location("autoprune_collapse", _path)
apc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(apc)


def _layer(mode, momentum=0.0, floor=0.0):
    torch.manual_seed(0)
    layer = TreeFF(6, depth=2, trees=2, backend="reference")
    hook = apc.RunningCentre(mode, momentum, floor=floor)
    layer.register_forward_pre_hook(hook)
    return layer, hook


@pytest.mark.parametrize("mode", ["centre", "standardise", "whiten"])
def test_transform_uses_earlier_batches_only_and_never_updates_in_eval(mode):
    layer, hook = _layer(mode)
    x1 = torch.randn(4, 50, 6) * torch.tensor([3.0, 1, 1, 0.5, 0.2, 1]) + 2.0
    x2 = torch.randn(4, 50, 6)
    seen = []
    layer.register_forward_hook(lambda m, a, out: seen.append(a[0].detach()))
    layer.train()
    layer(x1)
    assert torch.equal(seen[-1], x1)  # no earlier batch: the first one passes unchanged
    layer(x2)
    flat = x1.reshape(-1, 6)
    centred2 = x2 - flat.mean(0)
    if mode == "centre":
        expected = centred2
    elif mode == "standardise":
        expected = centred2 / (flat - flat.mean(0)).square().mean().add(hook.eps).sqrt()
    else:
        expected = centred2 @ hook._transform((flat - flat.mean(0)).T @ (flat - flat.mean(0)) / len(flat))
    torch.testing.assert_close(seen[-1], expected, rtol=1e-5, atol=1e-6)
    layer.eval()
    before = (hook.mean.clone(), hook.cov.clone())
    layer(torch.randn(3, 6) * 10)
    assert torch.equal(hook.mean, before[0]) and torch.equal(hook.cov, before[1])


def test_whitened_and_standardised_batches_have_the_intended_spread():
    # seeded and well conditioned: an unseeded random mix was sometimes near-singular, and fp32 whitening
    # of it missed the identity by 1e-3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g) @ (torch.randn(6, 6, generator=g) + 3 * torch.eye(6)) + 1.0
    cov = torch.cov(x.T, correction=0)
    white = (x - x.mean(0)) @ apc.RunningCentre("whiten", 0.0, floor=0.0, eps=0.0)._transform(cov)
    torch.testing.assert_close(torch.cov(white.T, correction=0), torch.eye(6), rtol=1e-4, atol=1e-4)
    std = (x - x.mean(0)) @ apc.RunningCentre("standardise", 0.0, eps=0.0)._transform(cov)
    assert float(std.square().mean()) == pytest.approx(1.0, rel=1e-4)
    # the floor keeps a direction the tokens do not vary in from being blown up
    flat = torch.cat([x[:, :5], torch.full((2000, 1), 3.0)], 1)
    t = apc.RunningCentre("whiten", 0.0, floor=1e-2)._transform(torch.cov(flat.T, correction=0))
    assert torch.isfinite(t).all() and float(t[5, 5]) < 1e3


def test_centring_is_a_bias_shift_of_the_same_layer():
    """x - m into the layer equals x into the layer with every node's bias moved by -w.m."""
    layer, hook = _layer("centre")
    layer.train()
    x1, x2 = torch.randn(80, 6) + 1.5, torch.randn(30, 6) + 1.5
    layer(x1)
    with torch.no_grad():
        out = layer(x2)
        shifted = TreeFF(6, depth=2, trees=2, backend="reference")
        shifted.load_state_dict(layer.state_dict())
        shifted.b_in -= torch.einsum("tnd,d->tn", layer.w_in, x1.mean(0))
        # node activation: z equal on every node, so the paths and outputs are equal
        torch.testing.assert_close(out, shifted(x2), rtol=1e-5, atol=1e-5)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        apc.RunningCentre("none", 0.0)
