"""The numba tree inference kernel against the masked reference (fp32, 1e-5 relative)."""
import pytest
import torch

from dynsparse.activations import REGISTRY
from dynsparse.ops.tree import numba_infer as tree_infer
from dynsparse.ops.tree.numba_infer import tree_infer_numba as tree_forward_kernel

ACTIVATION_CODES = {name: a.code for name, a in REGISTRY.items()}
from dynsparse.ops.tree.reference import tree_ff_masked


def _params(trees, depth, d, d_out, bias, seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 ** (depth + 1) - 1
    w_in = torch.randn(trees, n, d, generator=g) / d**0.5
    b_in = torch.randn(trees, n, generator=g) * 0.3 if bias else None
    w_out = torch.randn(trees, n, d_out, generator=g)
    return w_in, b_in, w_out


def _margin(x, w_in, b_in, depth):
    """Smallest |z| on each token's path over all trees (the tokens a rounding change could re-route)."""
    z = torch.einsum("md,tnd->mtn", x.double(), w_in.double())
    if b_in is not None:
        z = z + b_in.double()
    node = torch.zeros(z.shape[:2], dtype=torch.long)
    margin = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    for _ in range(depth + 1):
        zn = z.gather(-1, node.unsqueeze(-1)).squeeze(-1)
        margin = torch.minimum(margin, zn.abs().min(1).values)
        node = 2 * node + 1 + (zn > 0).long()
    return margin


CASES = [  # trees, depth, d, d_out, tokens
    (1, 0, 8, 8, 5),
    (1, 3, 16, 5, 7),
    (2, 5, 40, 24, 33),
    (1, 11, 24, 16, 130),
    (16, 4, 32, 16, 50),
    (3, 6, 17, 9, 67),
    (6, 3, 20, 12, 7),  # 3 leftover tokens: four trees at a time, then two one by one
]


@pytest.mark.parametrize("trees,depth,d,d_out,m", CASES)
@pytest.mark.parametrize("act_position", ["node", "path"])
@pytest.mark.parametrize("threaded", [False, True])
def test_kernel_matches_masked_reference(trees, depth, d, d_out, m, act_position, threaded, monkeypatch):
    monkeypatch.setattr(tree_infer, "PARALLEL_MIN_WORK", 0 if threaded else 1 << 62)
    for seed, (activation, bias) in enumerate([("gelu", True), ("relu", False), ("silu", True), ("tanh", True), ("identity", False)]):
        w_in, b_in, w_out = _params(trees, depth, d, d_out, bias, seed)
        x = torch.randn(m, d, generator=torch.Generator().manual_seed(100 + seed))
        want, want_leaves = tree_ff_masked(x, w_in, b_in, w_out, depth, activation, act_position)
        y, leaves = tree_forward_kernel(x, w_in, b_in, w_out, depth, ACTIVATION_CODES[activation], act_position == "path")
        assert y.shape == (m, d_out) and leaves.shape == (m, trees) and leaves.dtype == torch.int64
        clear = _margin(x, w_in, b_in, depth) > 1e-4
        assert clear.float().mean() > 0.9
        assert torch.equal(leaves[clear], want_leaves[clear])
        scale = want[clear].abs().max()
        assert (y[clear] - want[clear]).abs().max() <= 1e-5 * scale


def test_serial_and_threaded_kernels_agree(monkeypatch):
    w_in, b_in, w_out = _params(4, 6, 32, 32, True, 7)
    x = torch.randn(201, 32)
    monkeypatch.setattr(tree_infer, "PARALLEL_MIN_WORK", 0)
    y_par, l_par = tree_forward_kernel(x, w_in, b_in, w_out, 6, 0, False)
    monkeypatch.setattr(tree_infer, "PARALLEL_MIN_WORK", 1 << 62)
    parts = [tree_forward_kernel(x[i : i + 3], w_in, b_in, w_out, 6, 0, False) for i in range(0, 201, 3)]
    y_ser, l_ser = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    clear = _margin(x, w_in, b_in, 6) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(l_par[clear], l_ser[clear])
    assert torch.allclose(y_par[clear], y_ser[clear], rtol=1e-5, atol=1e-5)


def test_weight_views_follow_in_place_updates_and_replaced_data():
    w_in, b_in, w_out = (torch.nn.Parameter(t) for t in _params(1, 4, 16, 8, True, 3))
    x = torch.randn(9, 16)
    y0, _ = tree_forward_kernel(x, w_in, b_in, w_out, 4, 4, False)
    with torch.no_grad():
        w_out.mul_(2.0)
    y1, _ = tree_forward_kernel(x, w_in, b_in, w_out, 4, 4, False)
    assert torch.allclose(y1, 2 * y0)
    w_out.data = torch.zeros_like(w_out)
    y2, _ = tree_forward_kernel(x, w_in, b_in, w_out, 4, 4, False)
    assert torch.all(y2 == 0)


def test_bf16_and_non_contiguous_inputs():
    w_in, b_in, w_out = _params(2, 3, 16, 8, True, 5)
    x = torch.randn(16, 12)[:, :8].repeat(1, 2)  # contiguous copy of strided data
    xt = torch.randn(16, 10).t()[:, :].contiguous().t()  # non-contiguous (16, 10) view
    y, _ = tree_forward_kernel(x.bfloat16(), w_in.bfloat16(), b_in.bfloat16(), w_out.bfloat16(), 3, 0, False)
    assert y.dtype == torch.bfloat16
    w_in2, b_in2, w_out2 = _params(2, 3, 10, 8, True, 5)
    y_nc, _ = tree_forward_kernel(xt, w_in2, b_in2, w_out2, 3, 0, False)
    y_c, _ = tree_forward_kernel(xt.contiguous(), w_in2, b_in2, w_out2, 3, 0, False)
    assert torch.equal(y_nc, y_c)



@pytest.mark.parametrize("act_position", ["node", "path"])
def test_bf16_weight_tables_are_read_exactly(act_position):
    """bf16 tables are widened in registers, so the kernel equals the fp32 kernel on the same values."""
    w_in, b_in, w_out = (t.bfloat16() for t in _params(5, 6, 40, 24, True, 11))
    x = torch.randn(37, 40, generator=torch.Generator().manual_seed(12))
    path = act_position == "path"
    y16, l16 = tree_forward_kernel(x, w_in, b_in, w_out, 6, 0, path)
    y32, l32 = tree_forward_kernel(x, w_in.float(), b_in.float(), w_out.float(), 6, 0, path)
    clear = _margin(x, w_in.float(), b_in.float(), 6) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(l16[clear], l32[clear])
    assert torch.allclose(y16[clear], y32[clear], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trees,depth,d,d_out,m", CASES)
@pytest.mark.parametrize("act_position", ["node", "path"])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_kernel_matches_masked_reference(trees, depth, d, d_out, m, act_position, threads):
    """The C++ walk (fewer than 16 tokens; from 16 on the cpp backend hands over to numba), four trees at a
    time with the rest one by one, trees split over threads."""
    from dynsparse.ops._cpp import cpp_available
    from dynsparse.ops.tree import tree_infer as infer

    if not cpp_available():
        pytest.skip("the C++ kernels did not build here")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, (activation, bias) in enumerate([("gelu", True), ("relu", False), ("silu", True), ("identity", False)]):
            w_in, b_in, w_out = _params(trees, depth, d, d_out, bias, seed)
            for tokens in (1, min(m, 15), m):
                x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(100 + seed))
                want, want_leaves = tree_ff_masked(x, w_in, b_in, w_out, depth, activation, act_position)
                y, leaves = infer(x, w_in, b_in, w_out, depth, activation, act_position, backend="cpp")
                assert y.shape == (tokens, d_out) and leaves.shape == (tokens, trees) and leaves.dtype == torch.int64
                clear = _margin(x, w_in, b_in, depth) > 1e-4
                assert torch.equal(leaves[clear], want_leaves[clear])
                scale = want[clear].abs().max() if clear.any() else 1.0
                assert (y[clear] - want[clear]).abs().max() <= 1e-5 * scale
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("act_position", ["node", "path"])
def test_cpp_kernel_reads_bf16_tables_exactly(act_position):
    from dynsparse.ops._cpp import cpp_available

    if not cpp_available():
        pytest.skip("the C++ kernels did not build here")
    w_in, b_in, w_out = (t.bfloat16() for t in _params(5, 6, 40, 24, True, 11))
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(12)).bfloat16()
    path = act_position == "path"
    y16, l16 = torch.ops.dynsparse_cpp.tree_infer(x, w_in, b_in, w_out, 6, 0, path)
    y32, l32 = torch.ops.dynsparse_cpp.tree_infer(x.float(), w_in.float(), b_in.float(), w_out.float(), 6, 0, path)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(l16, l32)
    torch.testing.assert_close(y16, y32.bfloat16())
    with pytest.raises(RuntimeError, match="not the 2\\^\\(depth\\+1\\) - 1 of depth 5"):
        torch.ops.dynsparse_cpp.tree_infer(x.float(), w_in.float(), None, w_out.float(), 5, 0, path)
