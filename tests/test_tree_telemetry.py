"""Routing telemetry: counts match the paths, statistics are right on hand-made counts, state survives."""
import io
import math

import pytest
import torch

from dynsparse import TreeFF
from dynsparse.ops.tree.reference import route_dense
from dynsparse.tree.telemetry import node_visits_from_leaves, usage_from_leaf_visits


def _paths(layer, x):
    with torch.no_grad():
        z = torch.einsum("md,tnd->mtn", x, layer.w_in) + layer.b_in
        return route_dense(z, layer.depth)


@pytest.mark.parametrize("backend", ["reference", "torch", "numba"])
def test_visit_counts_match_the_paths(backend):
    layer = TreeFF(8, 4, trees=3, backend=backend).eval().track_usage(True)
    x = torch.randn(200, 8)
    with torch.no_grad():
        layer(x[:120])
        layer(x[120:])
    expected = torch.zeros(3, layer.nodes, dtype=torch.int64)
    paths = _paths(layer, x)
    for t in range(3):
        expected[t] += torch.bincount(paths[:, t].reshape(-1), minlength=layer.nodes)
    stats = layer.usage_stats()
    assert torch.equal(stats.node_visits, expected)
    assert stats.tokens == 200


def test_tracking_is_off_by_default_and_reset_works():
    layer = TreeFF(4, 2)
    layer(torch.randn(10, 4))
    assert layer.leaf_visits.sum() == 0
    layer.track_usage()
    layer(torch.randn(10, 4))
    assert layer.leaf_visits.sum() == 10
    layer.reset_usage()
    assert layer.leaf_visits.sum() == 0


def test_counts_survive_state_dict_round_trip():
    layer = TreeFF(4, 3, trees=2).track_usage()
    layer(torch.randn(50, 4))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = TreeFF(4, 3, trees=2)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.leaf_visits, layer.leaf_visits)
    assert other.usage_stats().to_dict() == layer.usage_stats().to_dict()


def test_statistics_on_known_counts():
    # depth 2, one tree: 4 leaves. All 8 tokens go left-left: a fully collapsed tree.
    collapsed = usage_from_leaf_visits(torch.tensor([[8, 0, 0, 0]]))
    assert collapsed.node_visits.tolist() == [[8, 8, 0, 8, 0, 0, 0]]
    assert math.isclose(collapsed.dead_fraction, 4 / 7)
    assert collapsed.static_fraction == 1.0
    assert collapsed.path_entropy == 0.0 and collapsed.effective_leaves == 1.0
    assert collapsed.balance_by_depth == [0.0, 0.0]
    assert collapsed.right_fraction_by_depth == [0.0, 0.0]
    # Uniform traffic: every node splits evenly.
    uniform = usage_from_leaf_visits(torch.tensor([[5, 5, 5, 5]]))
    assert uniform.dead_fraction == 0.0 and uniform.static_fraction == 0.0
    assert math.isclose(uniform.path_entropy, 1.0) and math.isclose(uniform.effective_leaves, 4.0)
    assert uniform.balance_by_depth == [1.0, 1.0]
    # Half the leaves used: root splits evenly, each child is static.
    half = usage_from_leaf_visits(torch.tensor([[6, 0, 0, 6]]))
    assert math.isclose(half.path_entropy, 0.5) and math.isclose(half.effective_leaves, 2.0)
    assert half.static_fraction == pytest.approx(2 / 3)
    assert half.balance_by_depth == [1.0, 0.0]


def test_node_visits_from_leaves_orders_by_heap():
    v = node_visits_from_leaves(torch.tensor([[1, 2, 3, 4]]))
    assert v.tolist() == [[10, 3, 7, 1, 2, 3, 4]]


def test_usage_dict_is_json_ready():
    import json

    layer = TreeFF(4, 0).track_usage()
    layer(torch.randn(3, 4))
    d = layer.usage_stats().to_dict(with_visits=True)
    json.dumps(d)
    assert d["path_entropy"] == 1.0 and d["node_visits"] == [[3]]
