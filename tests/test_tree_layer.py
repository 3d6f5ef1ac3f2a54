"""TreeFF: the three execution paths compute one function; the contract's details; bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsparse import TreeFF
from dynsparse.activations import NAMES
from dynsparse.ops.backend import resolve
from dynsparse.ops._cpp import cpp_available
from dynsparse.ops.tree import supported_backends, tree_train
from dynsparse.ops.tree.reference import route_dense
from tree_helpers import unambiguous_inputs

ACTS = sorted(NAMES)


def _forward(layer, x, backend):
    layer.backend = backend
    with torch.no_grad():
        return layer(x)


def _grads(layer, x, backend):
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    weights = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    (y * weights).sum().backward()
    grads = {"x": x.grad, "w_in": layer.w_in.grad, "w_out": layer.w_out.grad}
    if layer.b_in is not None:
        grads["b_in"] = layer.b_in.grad
    return y.detach(), grads


@settings(max_examples=40, deadline=None)
@given(
    depth=st.integers(0, 12),
    trees=st.integers(1, 16),
    d_model=st.integers(1, 24),
    d_out=st.integers(1, 24),
    act=st.sampled_from(ACTS),
    position=st.sampled_from(["node", "path"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backends_agree(depth, trees, d_model, d_out, act, position, bias, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = TreeFF(d_model, depth, trees=trees, d_out=d_out, activation=act, act_position=position, bias=bias)
    x = unambiguous_inputs(layer, 12, generator=g)
    y_ref, g_ref = _grads(layer, x, "reference")
    for backend in ("torch", "numba"):
        y_gat, g_gat = _grads(layer, x, backend)
        y_ker = _forward(layer, x, backend)
        torch.testing.assert_close(y_gat, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y_ker, y_ref, atol=1e-5, rtol=1e-5)
        for name in g_ref:
            torch.testing.assert_close(g_gat[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("position", ["node", "path"])
def test_gradients_match_in_float64(position):
    layer = TreeFF(10, 5, trees=3, d_out=7, act_position=position, dtype=torch.float64)
    x = unambiguous_inputs(layer, 64)
    _, g_ref = _grads(layer, x, "reference")
    _, g_gat = _grads(layer, x, "torch")
    for name in g_ref:
        torch.testing.assert_close(g_gat[name], g_ref[name], atol=1e-12, rtol=1e-10, msg=name)


def test_gradcheck_gather_path():
    layer = TreeFF(4, 2, trees=2, d_out=3, act_position="node", dtype=torch.float64)
    x = unambiguous_inputs(layer, 5, margin=1e-2)
    def f(x, w_in, b_in, w_out):
        return tree_train(x, w_in, b_in, w_out, 2, "gelu", "node", "torch")[0]

    inputs = (x.requires_grad_(), layer.w_in.detach().requires_grad_(), layer.b_in.detach().requires_grad_(),
              layer.w_out.detach().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "numba"])
def test_unvisited_nodes_get_exactly_zero_gradient(backend):
    layer = TreeFF(8, 6, trees=2, backend=backend)
    x = torch.randn(5, 8)
    layer(x).square().sum().backward()
    visited = torch.zeros(2, layer.nodes, dtype=torch.bool)
    with torch.no_grad():
        z = torch.einsum("md,tnd->mtn", x, layer.w_in) + layer.b_in
        paths = route_dense(z, layer.depth)
    for t in range(2):
        visited[t, paths[:, t].reshape(-1)] = True
    assert (~visited).sum() > 0
    assert torch.count_nonzero(layer.w_in.grad[~visited]) == 0
    assert torch.count_nonzero(layer.w_out.grad[~visited]) == 0
    assert torch.count_nonzero(layer.b_in.grad[~visited]) == 0
    assert torch.count_nonzero(layer.w_out.grad[visited]) > 0


def test_routing_follows_the_sign_of_z_and_the_path_sum():
    """A hand-built depth-1 tree: root z<=0 goes to node 1, z>0 to node 2."""
    layer = TreeFF(1, 1, trees=1, d_out=1, activation="identity", bias=False, backend="reference")
    with torch.no_grad():
        layer.w_in.copy_(torch.tensor([[[1.0], [2.0], [3.0]]]))
        layer.w_out.copy_(torch.tensor([[[10.0], [100.0], [1000.0]]]))
    x = torch.tensor([[-1.0], [2.0], [0.0]])
    y = layer(x).squeeze(-1)
    # x=-1: z_root=-1 -> node 1 (z=-2): -10 - 200; x=2: z=2 -> node 2 (z=6): 20 + 6000; x=0: z=0 -> left: 0
    assert y.tolist() == [-210.0, 6020.0, 0.0]


def test_path_position_applies_activation_after_the_sum():
    layer = TreeFF(1, 1, trees=2, d_out=1, activation="relu", act_position="path", bias=False, backend="reference")
    with torch.no_grad():
        layer.w_in.fill_(1.0)
        layer.w_out.copy_(torch.tensor([[[1.0], [1.0], [-3.0]], [[1.0], [1.0], [1.0]]]))
    # x=1: every z=1, both trees go right: tree0 relu(1-3)=0, tree1 relu(1+1)=2
    assert layer(torch.tensor([[1.0]])).item() == 2.0
    layer.act_position = "node"
    # node form: tree0 relu(1)*1 + relu(1)*-3 = -2, tree1 2 -> 0
    assert layer(torch.tensor([[1.0]])).item() == 0.0


def test_shapes_counts_and_init():
    layer = TreeFF(768, 11, trees=1)
    assert layer.nodes == 4095
    assert layer.w_in.shape == (1, 4095, 768) and layer.w_out.shape == (1, 4095, 768)
    assert layer.b_in.shape == (1, 4095)
    assert math.isclose(layer.active_fraction, 12 / 4095)
    assert layer.flops_per_token == 2 * 12 * (768 + 768)
    assert layer.w_in.abs().max() <= 1 / math.sqrt(768)
    assert layer.w_out.abs().max() <= 1 / math.sqrt(12)
    assert layer.w_out.abs().max() > 0.9 / math.sqrt(12)
    assert math.isclose(TreeFF(8, 7).active_fraction, 8 / 255)
    assert TreeFF(8, 2, bias=False).b_in is None


def test_leading_dimensions_are_kept():
    layer = TreeFF(6, 3, trees=2, d_out=5).eval()
    x = torch.randn(2, 3, 4, 6)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 3, 4, 5)
    torch.testing.assert_close(y.reshape(-1, 5), layer(x.reshape(-1, 6)).detach())


def test_default_backend_choice():
    layer = TreeFF(4, 2)
    x = torch.randn(3, 4)
    assert resolve(layer.backend, x.device, supported_backends(x, layer.w_in, train=True)) == "numba"
    inference = "cpp" if cpp_available() else "numba"  # the C++ walk; it hands 16+ tokens to numba
    assert resolve(layer.backend, x.device, supported_backends(x, layer.w_in, train=False)) == inference
    x64, w64 = x.double(), layer.w_in.double()
    assert resolve("auto", x.device, supported_backends(x64, w64, train=False)) == "torch"  # numba rounds to fp32
    with pytest.raises(ValueError, match="'numba' does not serve"):
        resolve("numba", x.device, supported_backends(x64, w64, train=False))


def test_bfloat16_runs_and_tracks_fp32():
    layer = TreeFF(32, 4, trees=4)
    x = unambiguous_inputs(layer, 16, margin=0.05)
    ref = layer(x)
    layer16 = TreeFF(32, 4, trees=4, dtype=torch.bfloat16)
    layer16.load_state_dict(layer.state_dict())
    for backend in ("reference", "torch"):
        layer16.backend = backend
        y = layer16(x.bfloat16())
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert layer16.w_in.grad.dtype == torch.bfloat16
        assert (y.float() - ref).abs().max() < 0.1
    with torch.no_grad():
        layer16.backend = "numba"
        assert layer16(x.bfloat16()).dtype == torch.bfloat16


def test_autocast_bfloat16_training():
    layer = TreeFF(16, 3, trees=2)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.w_in.grad is not None and layer.w_in.grad.dtype == torch.float32


def test_explicit_backend_that_cannot_serve_is_refused():
    layer = TreeFF(4, 2, backend="numba", dtype=torch.float64)  # numba would round float64 routing
    with pytest.raises(ValueError, match="'numba' does not serve"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "bogus"
    with pytest.raises(AttributeError, match="now TreeFF.backend"):
        layer.impl = "kernel"  # the old name must not be silently ignored


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"depth": -1}, ValueError, "depth"),
        ({"depth": 25}, ValueError, "depth"),
        ({"depth": 2.0}, TypeError, "depth"),
        ({"trees": 0}, ValueError, "trees"),
        ({"activation": "swish"}, ValueError, "activation"),
        ({"act_position": "leaf"}, ValueError, "act_position"),
        ({"backend": "fast"}, ValueError, "backend"),
        ({"d_out": 0}, ValueError, "d_out"),
    ],
)
def test_bad_constructor_arguments(kwargs, err, match):
    args = {"d_model": 4, "depth": 2, **kwargs}
    with pytest.raises(err, match=match):
        TreeFF(**args)


def test_bad_inputs():
    layer = TreeFF(4, 2, check_finite=True)
    with pytest.raises(ValueError, match="d_model=4"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="d_model=4"):
        layer(torch.randn(4, 1))  # no silent broadcast of a trailing 1
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * 4])
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 4, dtype=torch.float64))
    TreeFF(4, 2)(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))  # unchecked by default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("position", ["node", "path"])
def test_cuda_matches_cpu(position):
    layer = TreeFF(16, 5, trees=4, act_position=position)
    x = unambiguous_inputs(layer, 32, margin=1e-3)
    y_cpu, g_cpu = _grads(layer, x, "reference")
    layer.cuda()
    for backend in ("reference", "torch", "triton"):
        y, g = _grads(layer, x.cuda(), backend)
        torch.testing.assert_close(y.cpu(), y_cpu, atol=1e-4, rtol=1e-4)
        for name in g_cpu:
            torch.testing.assert_close(g[name].cpu(), g_cpu[name], atol=1e-4, rtol=1e-3)
