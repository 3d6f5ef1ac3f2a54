"""The tree training op (forward + backward, numba and torch backends) against the masked reference."""
import pytest
import torch

from dynsparse.ops.tree import supported_backends, tree_train
from dynsparse.ops.tree.reference import tree_ff_masked


def train_kernels_apply(x, w_in, b_in, w_out):
    return "numba" in supported_backends(x, w_in, train=True)


def tree_ff_gather(x, w_in, b_in, w_out, depth, activation, act_position, backend="auto"):
    return tree_train(x, w_in, b_in, w_out, depth, activation, act_position, backend)

CASES = [(1, 3, 37, 16, 5), (3, 5, 33, 40, 24), (2, 0, 9, 8, 8), (16, 4, 50, 32, 16), (1, 9, 70, 12, 20)]


def _run(fn, x, params, depth, activation, act_position, grad_y):
    x = x.clone().requires_grad_(True)
    params = [None if p is None else p.clone().requires_grad_(True) for p in params]
    y, leaves = fn(x, *params, depth, activation, act_position)
    y.backward(grad_y)
    return y.detach(), leaves, x.grad, [None if p is None else p.grad for p in params]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("trees,depth,m,d,d_out", CASES)
@pytest.mark.parametrize("act_position", ["node", "path"])
@pytest.mark.parametrize("backend", ["numba", "torch", "reference"])
def test_gradients_match_masked_reference(trees, depth, m, d, d_out, act_position, backend):
    g = torch.Generator().manual_seed(trees * 100 + depth)
    n = 2 ** (depth + 1) - 1
    for activation, bias in [("gelu", True), ("relu", True), ("silu", False), ("tanh", True), ("identity", False)]:
        params = [torch.randn(trees, n, d, generator=g) / d**0.5,
                  torch.randn(trees, n, generator=g) * 0.3 if bias else None,
                  torch.randn(trees, n, d_out, generator=g)]
        x, grad_y = torch.randn(m, d, generator=g), torch.randn(m, d_out, generator=g)
        assert train_kernels_apply(x, *params)
        y0, l0, gx0, gp0 = _run(tree_ff_masked, x, params, depth, activation, act_position, grad_y)
        y1, l1, gx1, gp1 = _run(lambda *a: tree_ff_gather(*a, backend=backend), x, params, depth, activation,
                                act_position, grad_y)
        # inputs are well away from routing ties at these sizes; a tie would show up as a leaf mismatch
        assert torch.equal(l0, l1)
        assert _rel(y1, y0) < 1e-5 and _rel(gx1, gx0) < 1e-4
        for a, b in zip(gp1, gp0):
            if b is not None:
                assert _rel(a, b) < 1e-4
        # nodes no token visited: exactly zero gradient (the reference's mask gives exact zeros too)
        visited = gp0[2].abs().sum(-1) != 0
        assert torch.all(gp1[0][~visited] == 0) and torch.all(gp1[2][~visited] == 0)
        if depth >= 9:
            assert (~visited).any()  # the check above is not vacuous


def test_float64_and_bf16_use_the_torch_path():
    params = [torch.randn(2, 15, 8, dtype=torch.float64), None, torch.randn(2, 15, 4, dtype=torch.float64)]
    x = torch.randn(5, 8, dtype=torch.float64)
    assert not train_kernels_apply(x, *params)
    _, _, gx, _ = _run(tree_ff_gather, x, params, 3, "gelu", "node", torch.randn(5, 4, dtype=torch.float64))
    assert gx.dtype == torch.float64
    xb = x.bfloat16()
    assert not train_kernels_apply(xb, *(p.bfloat16() if p is not None else None for p in params))
