"""TreeFF's inference fast path (eval, no grad, fp32 CPU) against the general path and the reference."""
import copy
import io

import pytest
import torch
from tree_helpers import routing_margin, unambiguous_inputs

from dynsparse import TreeFF
from dynsparse.ops.backend import numba_available
from dynsparse.tree import layer as layer_mod

pytestmark = pytest.mark.skipif(not numba_available(), reason="the fast path runs the numba kernel")


def _layer(**kw):
    torch.manual_seed(0)
    return TreeFF(24, 5, trees=3, d_out=16, **kw).eval()


def _general(layer, x):
    """The same call forced through the general (checked) path."""
    saved = layer._fast_path_applies
    layer._fast_path_applies = lambda x: False
    try:
        return layer(x)
    finally:
        del layer._fast_path_applies
        assert layer._fast_path_applies.__func__ is saved.__func__


@pytest.mark.parametrize("act_position", ["node", "path"])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_equals_general_path_and_reference(act_position, bias):
    layer = _layer(act_position=act_position, bias=bias)
    x = unambiguous_inputs(layer, 40, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert layer._fast_path_applies(x)
        fast = layer(x)
        general = _general(layer, x)
        layer.backend = "reference"
        reference = layer(x)
    assert torch.equal(fast, general)
    assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_fast_path_shapes_strides_and_empty_batches():
    layer = _layer()
    x = unambiguous_inputs(layer, 24, torch.Generator().manual_seed(2))
    with torch.no_grad():
        flat = layer(x)
        assert torch.equal(layer(x.view(2, 3, 4, 24)), flat.view(2, 3, 4, 16))
        assert torch.allclose(layer(x[0]), flat[0], rtol=1e-5, atol=1e-6)  # one token: another summation order
        strided = torch.stack([x, -x], dim=-1).view(24, 48)[:, ::2]  # x's values, non-contiguous
        assert not strided.is_contiguous() and torch.equal(layer(strided), flat)
        assert layer(x[:0]).shape == (0, 16)


def test_fast_path_only_where_it_applies():
    layer = _layer()
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert layer._fast_path_applies(x)
        assert not layer._fast_path_applies(x.double())
        assert not layer._fast_path_applies(torch.nn.Parameter(x))
        layer.train()
        assert not layer._fast_path_applies(x)
        layer.eval()
        layer.backend = "torch"
        assert not layer._fast_path_applies(x)
        layer.backend = "auto"
        layer.check_finite = True
        assert not layer._fast_path_applies(x)
        layer.check_finite = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not layer._fast_path_applies(x)
    assert not layer._fast_path_applies(x)  # grad enabled
    with torch.no_grad(), pytest.raises(ValueError, match="d_model=24"):
        layer(torch.randn(5, 23))  # falls through to the general path's check


def test_fast_path_follows_weight_updates_and_replacements():
    layer = _layer()
    x = unambiguous_inputs(layer, 16, torch.Generator().manual_seed(3))
    with torch.no_grad():
        y0 = layer(x)
        layer.w_out.mul_(2.0)  # in place: seen through the cached views
        assert torch.allclose(layer(x), 2 * y0)
        layer.load_state_dict({k: v.clone() for k, v in _layer().state_dict().items()})
        assert torch.allclose(layer(x), y0)
        layer.w_out.data = torch.zeros_like(layer.w_out)  # new storage: views rebuilt
        assert torch.all(layer(x) == 0)
        layer.w_out = torch.nn.Parameter(torch.ones_like(layer.w_out))  # a new parameter object
        assert torch.equal(layer(x), _general(layer, x))


def test_fast_path_counts_routing_when_tracking():
    layer = _layer().track_usage(True)
    x = unambiguous_inputs(layer, 30, torch.Generator().manual_seed(4))
    with torch.no_grad():
        layer(x)
        fast_counts = layer.leaf_visits.clone()
        layer.reset_usage()
        _general(layer, x)
    assert fast_counts.sum() == 30 * 3
    assert torch.equal(fast_counts, layer.leaf_visits)


def test_cached_views_stay_out_of_saved_state():
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(3, 24))
    assert layer in layer_mod._KERNEL_VIEWS
    clone = copy.deepcopy(layer)
    assert clone not in layer_mod._KERNEL_VIEWS
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    assert set(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)) == {"w_in", "b_in", "w_out", "leaf_visits"}
    with torch.no_grad():
        x = torch.randn(4, 24)
        assert torch.equal(clone(x), layer(x))


def test_bf16_layer_takes_the_fast_path_and_matches_fp32():
    layer16 = _layer().bfloat16()
    ref32 = copy.deepcopy(layer16).float()  # the same (bf16-representable) weights in fp32
    x = unambiguous_inputs(ref32, 64, torch.Generator().manual_seed(5)).bfloat16()
    x = x[routing_margin(ref32, x.float()) > 1e-4][:32]  # still clear of ties after rounding to bf16
    with torch.no_grad():
        assert layer16._fast_path_applies(x)
        y16 = layer16(x)
        want = ref32(x.float())
        assert y16.dtype == torch.bfloat16
        assert torch.allclose(y16.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
        assert torch.equal(y16, _general(layer16, x))
        layer16.b_in.add_(1.0)  # the bf16 bias is copied to fp32: an in-place update must still be seen
        assert torch.equal(layer16(x), _general(layer16, x))
