"""The Triton kernels (tree FF layer, sparse MLP) against plain torch definitions. With a GPU they run
compiled on it; without one, on CPU tensors in Triton's interpreter. Skipped when triton is not installed.

Triton picks interpreted vs compiled when a function is decorated, its own standard library included,
and torch imports triton at its own import, before any test module runs. So on CPU, unless the process
started with TRITON_INTERPRET=1, the kernel tests here are skipped and one test re-runs this file in a
fresh pytest process that has the variable from its start (``test_kernels_in_interpreter``).
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from dynsparse import activations  # noqa: E402
from dynsparse.ops.tree.reference import route_dense, tree_ff_masked  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# compiled on a GPU, or interpreted because this whole process interprets
IN_PROCESS = DEVICE == "cuda" or not isinstance(triton.language.zeros, triton.runtime.JITFunction)
kernels = pytest.mark.skipif(not IN_PROCESS, reason="run by test_kernels_in_interpreter in a TRITON_INTERPRET=1 "
                                                    "process")
if IN_PROCESS:
    from dynsparse.ops.mlp import triton as MLP  # noqa: E402
    from dynsparse.ops.tree import triton as TREE  # noqa: E402


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_interpreter():
    assert os.environ.get("_DYNSPARSE_TRITON_INNER") != "1", "TRITON_INTERPRET=1 did not make triton interpret"
    env = dict(os.environ, TRITON_INTERPRET="1", _DYNSPARSE_TRITON_INNER="1")
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-o", "addopts=", "-q", "-x",
                          "-p", "no:cacheprovider"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"interpreted kernel tests failed:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "1 skipped" in summary, summary  # everything but this test ran


def _on(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


F32, BF16 = torch.float32, torch.bfloat16


def _close(got, want, dtype, what):
    """Error relative to the output's scale: float32 kernels to 1e-5, bfloat16 outputs to their rounding."""
    err = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    scale = max(1.0, want.float().abs().max().item() if want.numel() else 0.0)
    tol = 1e-5 if dtype == F32 else 1e-2
    assert err <= tol * scale, f"{what}: max error {err:.3g} at scale {scale:.3g}"


# ---------------------------------------------------------------------------------------------- tree
def _tree_data(m, trees, depth, d, d_out, bias, dtype, seed, margin=0.02):
    """Weights and tokens in ``dtype`` with every pre-activation at least ``margin`` from 0, so routing
    cannot depend on summation order. x[:, 0] == 1, so w_in[..., 0] shifts z like a bias."""
    g = torch.Generator().manual_seed(seed)
    n = 2 ** (depth + 1) - 1
    x = torch.randn(m, d, generator=g)
    x[:, 0] = 1.0
    w_in = torch.randn(trees, n, d, generator=g) / d**0.5
    b_in = 0.3 * torch.randn(trees, n, generator=g) if bias else None
    w_out = torch.randn(trees, n, d_out, generator=g) / (depth + 1) ** 0.5
    x, w_out = x.to(dtype), w_out.to(dtype)
    b_in = None if b_in is None else b_in.to(dtype)
    for _ in range(200):
        w_in = w_in.to(dtype)
        z = torch.einsum("md,tnd->mtn", x.double(), w_in.double())
        if b_in is not None:
            z = z + b_in.double()
        bad = (z.abs() < margin).any(0)
        if not bad.any():
            return x, w_in, b_in, w_out
        shift = torch.where(torch.rand(bad.shape, generator=g) < 0.5, -0.3, 0.3)
        w_in = w_in.float()
        w_in[..., 0] += torch.where(bad, shift, 0.0)
    raise AssertionError("could not move every pre-activation away from 0")


def _ref_paths(x, w_in, b_in, depth):
    z = torch.einsum("md,tnd->mtn", x.float(), w_in.float())
    if b_in is not None:
        z = z + b_in.float()
    return route_dense(z, depth)


def _tree_cases():
    """Every activation in both positions; trees, depth, bias, dtype and launch plans spread over them."""
    plans = [None, {"sub": 1, "fused": False}, {"sub": 2, "fused": True, "block_m": 4},
             {"sub": 3, "fused": False, "block_m": 2, "block_d": 4}, {"sub": 1, "fused": True, "block_n": 2}]
    cases = []
    for i, (pos, act) in enumerate(itertools.product(("node", "path"), activations.NAMES)):
        cases.append(pytest.param(
            (1, 3)[i % 2], (0, 1, 3)[i % 3], pos, act, i % 4 < 2, (F32, BF16)[(i // 4) % 2], plans[i % 5],
            id=f"{pos}-{act}-{i}"))
    return cases


TREE_CASES = _tree_cases()


@kernels
@pytest.mark.parametrize("trees,depth,pos,act,bias,dtype,plan", TREE_CASES)
def test_tree_infer_matches_reference(trees, depth, pos, act, bias, dtype, plan):
    m, d, d_out = 7, 9, 5
    x, w_in, b_in, w_out = _tree_data(m, trees, depth, d, d_out, bias, dtype, seed=trees * 10 + depth)
    f32 = [None if t is None else t.float() for t in (x, w_in, b_in, w_out)]
    want, want_leaves = tree_ff_masked(*f32[:4], depth, act, pos)
    for p in (None, plan):
        y, leaves = (t.cpu() for t in TREE.tree_infer_triton(*_on(x, w_in, b_in, w_out), depth, activations.code(act),
                                                             pos == "path", plan=p))
        assert y.dtype == dtype and y.shape == (m, d_out)
        assert leaves.dtype == torch.int64 and torch.equal(leaves, want_leaves)
        _close(y, want, dtype, f"y with plan {p}")


@kernels
@pytest.mark.parametrize("trees,depth,pos,act,bias,dtype,plan", TREE_CASES)
def test_tree_train_matches_autograd(trees, depth, pos, act, bias, dtype, plan):
    m, d, d_out = 7, 9, 5
    x, w_in, b_in, w_out = _tree_data(m, trees, depth, d, d_out, bias, dtype, seed=trees * 10 + depth + 1)
    if depth == 1:  # rows of x with a stride wider than d
        wide = torch.zeros(m, d + 5, dtype=dtype)
        wide[:, 2:2 + d] = x
        x = wide[:, 2:2 + d]
    ref_in = [t.float().requires_grad_() if t is not None else None for t in (x, w_in, b_in, w_out)]
    want, _ = tree_ff_masked(*ref_in, depth, act, pos)
    grad_y = torch.randn(want.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    want.backward(grad_y.float())
    code = activations.code(act)

    y, idx, zs = (t.cpu() for t in TREE.tree_train_forward_triton(*_on(x, w_in, b_in, w_out), depth, code,
                                                                  pos == "path", plan=plan))
    n = 2 ** (depth + 1) - 1
    flat = _ref_paths(x, w_in, b_in, depth) + torch.arange(trees)[None, :, None] * n
    assert idx.dtype == torch.int64 and torch.equal(idx, flat)
    assert zs.dtype == F32 and zs.shape == idx.shape
    _close(y, want.detach(), dtype, "y")
    z_all = torch.einsum("md,tnd->mtn", x.float(), w_in.float()) + (0 if b_in is None else b_in.float())
    _close(zs, z_all.flatten(1).gather(1, flat.flatten(1)).view_as(zs), F32, "zs")

    visited = torch.zeros(trees * n, dtype=torch.bool)
    visited[idx.flatten()] = True
    visited = visited.view(trees, n)
    # depth 3 reduces levels 0-2 in the block and scatters level 3 per token; depth 1 scatters all per token
    for pre, block_m in ((0, 4),) if depth == 1 else ((4, None),):
        g_x, g_in, g_b, g_out = (None if t is None else t.cpu() for t in TREE.tree_train_backward_triton(
            *_on(grad_y, x, w_in, b_in, w_out, idx, zs), code, pos == "path", pre=pre, block_m=block_m))
        _close(g_x, ref_in[0].grad, dtype, f"g_x pre={pre}")
        _close(g_in, ref_in[1].grad, dtype, f"g_w_in pre={pre}")
        _close(g_out, ref_in[3].grad, dtype, f"g_w_out pre={pre}")
        assert g_x.dtype == x.dtype and g_in.dtype == w_in.dtype and g_out.dtype == w_out.dtype
        assert not g_in[~visited].any() and not g_out[~visited].any()  # untouched rows are exact zeros
        if b_in is None:
            assert g_b is None
        else:
            _close(g_b, ref_in[2].grad, dtype, f"g_b_in pre={pre}")
            assert g_b.dtype == b_in.dtype and not g_b[~visited].any()


@kernels
@pytest.mark.parametrize("sub", [1, 3])
def test_tree_depth_11(sub):
    m, depth = 3, 11
    x, w_in, b_in, w_out = _tree_data(m, 1, depth, 5, 3, True, F32, seed=11)
    want, want_leaves = tree_ff_masked(x, w_in, b_in, w_out, depth, "gelu", "node")
    y, leaves = (t.cpu() for t in TREE.tree_infer_triton(*_on(x, w_in, b_in, w_out), depth, 0, False,
                                                         plan={"sub": sub}))
    assert torch.equal(leaves, want_leaves)
    _close(y, want, F32, "y")


@kernels
def test_tree_bf16_tokens_fp32_weights():
    x, w_in, b_in, w_out = _tree_data(6, 3, 2, 9, 4, True, F32, seed=3)
    x = x.to(BF16)  # x[:, 0] == 1 survives; the margin check is redone on the rounded x below
    z = torch.einsum("md,tnd->mtn", x.float(), w_in) + b_in
    assert (z.abs() > 1e-3).all()
    want, want_leaves = tree_ff_masked(x.float(), w_in, b_in, w_out, 2, "silu", "path")
    y, leaves = (t.cpu() for t in TREE.tree_infer_triton(*_on(x, w_in, b_in, w_out), 2, 2, True))
    assert y.dtype == BF16 and torch.equal(leaves, want_leaves)
    _close(y, want, BF16, "y")


@kernels
def test_tree_refuses_bad_input():
    x, w_in, b_in, w_out = _on(*_tree_data(2, 1, 1, 4, 3, True, F32, seed=0))
    with pytest.raises(ValueError, match="depth"):
        TREE.tree_infer_triton(x, w_in, b_in, w_out, 2, 0, False)
    with pytest.raises(ValueError, match="activation code"):
        TREE.tree_infer_triton(x, w_in, b_in, w_out, 1, 9, False)
    with pytest.raises(ValueError, match="w_out"):
        TREE.tree_infer_triton(x, w_in, b_in, w_out[:, :2], 1, 0, False)
    with pytest.raises(ValueError, match="features"):
        TREE.tree_infer_triton(x[:, :3], w_in, b_in, w_out, 1, 0, False)
    with pytest.raises(TypeError, match="x must be"):
        TREE.tree_infer_triton(x.double(), w_in, b_in, w_out, 1, 0, False)
    with pytest.raises(ValueError, match="plan keys"):
        TREE.tree_infer_triton(x, w_in, b_in, w_out, 1, 0, False, plan={"subb": 2})


# ---------------------------------------------------------------------------------------------- MLP
def _mlp_reference(x, w1, b1, w2_t, b2, wg, bg, offset, mask, act):
    f = activations.fn(act)

    def f32(t):
        return 0.0 if t is None else t.float()

    z = x.float() @ w1.float().T + f32(b1)
    h = f(z) if wg is None else f(x.float() @ wg.float().T + f32(bg)) * z
    h = h - f32(offset)
    return (h * mask) @ w2_t.float() + f32(b2)


def _mlp_weights(g, dtype, glu, bias, offset, m, d, d_ff, d_out):
    """x, w1, b1, w2_t, b2, wg, bg, offset of a random block, drawn from generator g in that order."""
    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    x = rnd(m, d)
    w1, w2_t = rnd(d_ff, d, scale=d**-0.5), rnd(d_ff, d_out, scale=d_ff**-0.5)
    b1, b2 = (rnd(d_ff), rnd(d_out)) if bias else (None, None)
    wg, bg = (rnd(d_ff, d, scale=d**-0.5), rnd(d_ff) if bias else None) if glu else (None, None)
    return x, w1, b1, w2_t, b2, wg, bg, rnd(d_ff, scale=0.1) if offset else None


def _mlp_cases():
    cases = []
    for i, (strategy, glu, offset) in enumerate(itertools.product(("token", "union", "grouped"), (False, True),
                                                                  (False, True))):
        act = activations.NAMES[i % len(activations.NAMES)]
        dtype = BF16 if i % 5 == 3 else F32
        cases.append(pytest.param(strategy, glu, offset, act, i % 3 != 1, dtype, id=f"{strategy}-{i}"))
    return cases


@kernels
@pytest.mark.parametrize("strategy,glu,offset,act,bias,dtype", _mlp_cases())
def test_sparse_mlp_matches_dense_masked(strategy, glu, offset, act, bias, dtype):
    g = torch.Generator().manual_seed(7)
    m, d, d_ff, d_out = 6, 11, 24, 9
    group = 4 if strategy == "grouped" else 1
    n_lists = d_ff // group
    x, w1, b1, w2_t, b2, wg, bg, off = _mlp_weights(g, dtype, glu, bias, offset, m, d, d_ff, d_out)
    lengths = [0, 1, n_lists, 3, 0, n_lists // 2]  # empty lists, a full one, partial ones
    lists = [torch.randperm(n_lists, generator=g)[:k] for k in lengths]
    if strategy == "union":
        union = torch.unique(torch.cat(lists))
        lists = [union if len(lst) else lst for lst in lists]
    indptr = torch.tensor([0] + [len(lst) for lst in lists]).cumsum(0)
    indices = torch.cat(lists).to(torch.int32)
    mask = torch.zeros(m, d_ff)
    for i, lst in enumerate(lists):
        for j in lst.tolist():
            mask[i, j * group:(j + 1) * group] = 1.0
    want = _mlp_reference(x, w1, b1, w2_t, b2, wg, bg, off, mask, act)
    for plan in (None, {"block_j": 8, "parts_h": 2, "parts_out": 2, "block_d": 8, "block_n": 8}):
        y = MLP.sparse_mlp_triton(*_on(x, w1, b1, w2_t, b2, wg, bg, off, indptr, indices), strategy, group,
                                  activations.code(act), plan=plan).cpu()
        assert y.dtype == dtype and y.shape == (m, d_out)
        _close(y, want, dtype, f"y with plan {plan}")
        if b2 is None:
            assert not y[0].any() and not y[4].any()  # empty lists give exactly b2 (here 0)
        else:
            assert torch.equal(y[0], b2) and torch.equal(y[4], b2)


@kernels
def test_sparse_mlp_all_lists_empty():
    x, w1, w2_t, b2 = torch.randn(3, 5), torch.randn(8, 5), torch.randn(8, 4), torch.randn(4)
    y = MLP.sparse_mlp_triton(*_on(x, w1, None, w2_t, b2, None, None, None, torch.zeros(4, dtype=torch.int64),
                                   torch.zeros(0, dtype=torch.int32)), "token", 1, 0).cpu()
    assert torch.equal(y, b2.expand(3, 4))


@kernels
def test_sparse_mlp_refuses_bad_input():
    x, w1, w2_t = _on(torch.randn(2, 5), torch.randn(8, 5), torch.randn(8, 4))
    indptr, indices = _on(torch.tensor([0, 1, 2]), torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="strategy"):
        MLP.sparse_mlp_triton(x, w1, None, w2_t, None, None, None, None, indptr, indices, "rows", 1, 0)
    with pytest.raises(ValueError, match="group_size"):
        MLP.sparse_mlp_triton(x, w1, None, w2_t, None, None, None, None, indptr, indices, "grouped", 3, 0)
    with pytest.raises(ValueError, match="indptr"):
        MLP.sparse_mlp_triton(x, w1, None, w2_t, None, None, None, None, indptr.int(), indices, "token", 1, 0)
    with pytest.raises(ValueError, match="w2_t"):
        MLP.sparse_mlp_triton(x, w1, None, w2_t[:7], None, None, None, None, indptr, indices, "token", 1, 0)
    with pytest.raises(ValueError, match="offset"):
        MLP.sparse_mlp_triton(x, w1, None, w2_t, None, None, None, x.new_zeros(7), indptr, indices, "token", 1, 0)


def _skip_weights(dtype, glu, bias, offset, seed=11):
    return _mlp_weights(torch.Generator().manual_seed(seed), dtype, glu, bias, offset, 5, 10, 20, 7)


@kernels
@pytest.mark.parametrize("bias,dtype", [(True, F32), (False, F32), (True, BF16)])
def test_relu_skip_matches_the_dense_relu_mlp(bias, dtype):
    from dynsparse.ops.mlp.reference import relu_skip_mlp_reference

    x, w1, b1, w2_t, b2, *_ = _skip_weights(dtype, False, bias, False)
    want = relu_skip_mlp_reference(x, w1, b1, w2_t, b2)
    for plan in (None, {"block_j": 4, "parts_out": 3, "block_n": 4}):
        y = MLP.relu_skip_mlp_triton(*_on(x, w1, b1, w2_t, b2), plan=plan).cpu()
        assert y.dtype == dtype and y.shape == want.shape
        _close(y, want, dtype, f"relu skip with plan {plan}")
    if bias:  # no neuron on: exactly b2
        assert torch.equal(MLP.relu_skip_mlp_triton(*_on(x, w1, b1 - 100, w2_t, b2)).cpu(), b2.expand(5, 7))


@kernels
@pytest.mark.parametrize("glu,offset,act,bias,dtype", [
    (True, False, "silu", True, F32), (True, True, "gelu", False, F32), (False, False, "relu", True, F32),
    (False, True, "tanh", True, F32), (True, True, "silu", True, BF16)])
def test_gate_skip_matches_the_masked_reference(glu, offset, act, bias, dtype):
    from dynsparse.ops.mlp.reference import gate_skip_mlp_reference

    x, w1, b1, w2_t, b2, wg, bg, off = _skip_weights(dtype, glu, bias, offset, seed=5)
    for t in (0.0, 0.2, 1e9):  # every neuron, some, none
        threshold = torch.tensor(t)
        want = gate_skip_mlp_reference(x, w1, b1, w2_t, b2, wg, bg, off, threshold, activations.code(act))
        for plan in (None, {"block_j": 4, "parts_h": 2, "parts_out": 2, "block_d": 4, "block_n": 4}):
            y = MLP.gate_skip_mlp_triton(*_on(x, w1, b1, w2_t, b2, wg, bg, off, threshold), activations.code(act),
                                         plan=plan).cpu()
            assert y.dtype == dtype and y.shape == want.shape
            _close(y, want, dtype, f"gate skip at threshold {t} with plan {plan}")


@kernels
def test_skip_ops_run_on_triton_through_the_registered_ops():
    from dynsparse.ops.mlp import MLPWeights, gate_skip_mlp, relu_skip_mlp
    from dynsparse.ops.mlp.reference import gate_skip_mlp_reference, relu_skip_mlp_reference

    x, w1, b1, w2_t, b2, wg, bg, _ = _on(*_skip_weights(F32, True, True, False))
    plain = MLPWeights(w1=w1, b1=b1, w2_t=w2_t, b2=b2)
    _close(relu_skip_mlp(x, plain, backend="triton").cpu(), relu_skip_mlp_reference(x, w1, b1, w2_t, b2).cpu(),
           F32, "relu_skip_mlp op")
    glu, t = MLPWeights(w1=w1, b1=b1, w2_t=w2_t, b2=b2, wg=wg, bg=bg), torch.tensor(0.2).to(DEVICE)
    want = gate_skip_mlp_reference(x, w1, b1, w2_t, b2, wg, bg, None, t, activations.code("silu"))
    _close(gate_skip_mlp(x, glu, t, activation="silu", backend="triton").cpu(), want.cpu(), F32, "gate_skip_mlp op")


@kernels
def test_skip_ops_refuse_bad_input():
    x, w1, b1, w2_t, b2, *_ = _on(*_skip_weights(F32, False, True, False))
    with pytest.raises(ValueError, match="do not chain"):
        MLP.relu_skip_mlp_triton(x, w1, b1, w2_t[:3], b2)
    with pytest.raises(ValueError, match="b1"):
        MLP.gate_skip_mlp_triton(x, w1, b1[:3], w2_t, b2, None, None, None, torch.tensor(0.1).to(DEVICE), 0)
    with pytest.raises(ValueError, match="plan keys"):
        MLP.relu_skip_mlp_triton(x, w1, b1, w2_t, b2, plan={"blockj": 4})


# ---------------------------------------------------------------------------------------------- GPU benchmark
def test_gpu_bench_case_list(capsys):
    """The benchmark's arguments and case list (what a GPU session will run), without running anything."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cases = bench.main(["--dry-run", "--sections", "peak,tree_infer,mlp,tree_train"])
    count = {s: sum(c["section"] == s for c in cases) for s in ("peak", "tree_infer", "mlp", "tree_train")}
    assert count == {"peak": 4, "tree_infer": 2 * 2 * 4, "mlp": 2 * 2 * 4, "tree_train": 2 * 2}
    assert {(c["trees"], c["depth"]) for c in cases if c["section"] == "tree_infer"} == {(1, 11), (16, 7)}
    assert {c["m"] for c in cases if c["section"] == "mlp"} == {1, 16, 256, 2048}
    assert "cases; budget 420 s" in capsys.readouterr().out
    skip = bench.main(["--dry-run", "--sections", "skip", "--dtypes", "fp32", "--tokens", "1,16"])
    assert [(c["op"], c["m"], c.get("sparsity")) for c in skip] == [
        ("relu_skip", 1, None), ("gate_skip", 1, 0.5), ("gate_skip", 1, 0.9),
        ("relu_skip", 16, None), ("gate_skip", 16, 0.5), ("gate_skip", 16, 0.9)]
    variants = bench.main(["--dry-run", "--sections", "variants", "--trees", "2x1", "--tokens", "1,8"])
    # no lookahead deeper than the tree
    assert {c["plan"]["sub"] for c in variants if c["op"] == "tree_infer"} == {1, 2}
    with pytest.raises(SystemExit):
        bench.parse_args(["--dry-run", "--sections", "peak,bogus"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--dry-run", "--trees", "16by7"])
    with pytest.raises(SystemExit):
        bench.parse_args([]) if "OUT" not in os.environ else bench.parse_args(["--budget-s", "0"])
