"""Static pruning keeps every seen path's output and removes the structure no token used."""
import pytest
import torch

from dynsparse import TreeFF, prune_static
from tree_helpers import unambiguous_inputs


@pytest.mark.parametrize("position", ["node", "path"])
@pytest.mark.parametrize("bias", [True, False])
def test_pruned_layer_is_exact_on_seen_paths(position, bias):
    layer = TreeFF(12, 6, trees=3, d_out=9, act_position=position, bias=bias).eval().track_usage()
    x = unambiguous_inputs(layer, 40, margin=1e-3)
    with torch.no_grad():
        y = layer(x)
        pruned = prune_static(layer)
        torch.testing.assert_close(pruned(x), y, atol=1e-5, rtol=1e-5)
    report = pruned.prune_report
    assert report.nodes_after < report.nodes_before
    assert report.params_after < report.params_before
    assert sum(p.numel() for p in pruned.parameters()) == report.params_after
    assert report.static_nodes > 0  # 40 tokens cannot fill 64 leaves x 3 trees
    assert "removed" in str(report)


def test_min_visits_drops_rare_subtrees_and_redirects_them():
    layer = TreeFF(6, 3, trees=1).track_usage()
    x = torch.randn(300, 6)
    with torch.no_grad():
        layer(x)
    p1, p5 = prune_static(layer, min_visits=1), prune_static(layer, min_visits=50)
    assert p5.prune_report.nodes_after < p1.prune_report.nodes_after
    with torch.no_grad():
        assert torch.isfinite(p5(torch.randn(10, 6))).all()


def test_gradients_flow_through_pruned_layer():
    layer = TreeFF(4, 2).track_usage()
    layer(torch.randn(20, 4))
    pruned = prune_static(layer)
    pruned(torch.randn(5, 4)).sum().backward()
    assert pruned.w_in.grad is not None


def test_bad_prune_requests():
    layer = TreeFF(4, 2)
    with pytest.raises(ValueError, match="calibration"):
        prune_static(layer)  # no counts yet
    with pytest.raises(ValueError, match="min_visits"):
        prune_static(layer, min_visits=0)
    with pytest.raises(TypeError, match="TreeFF"):
        prune_static(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shape"):
        prune_static(layer, leaf_visits=torch.ones(2, 2, dtype=torch.long))
