"""torch.compile sees the dynsparse ops as single graph nodes: fullgraph=True compiles (no graph break)
and the compiled layer, block and LM give the eager outputs and gradients."""
import pytest
import torch

from dynsparse import TreeFF
from dynsparse.lm import DynSparseLMConfig, DynSparseLMForCausalLM
from tree_helpers import unambiguous_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("position", ["node", "path"])
def test_compiled_tree_layer_inference_and_training(position):
    torch.manual_seed(0)
    layer = TreeFF(16, 4, trees=3, d_out=12, act_position=position)
    x = unambiguous_inputs(layer, 20)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
    layer.train()
    y_eager = layer(x)
    y_eager.square().sum().backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    for got, ref in zip([p.grad for p in layer.parameters()], want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def _tiny_tree_lm():
    torch.manual_seed(0)
    config = DynSparseLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=32, ff="tree", tree={"depth": 3, "trees": 2})
    return DynSparseLMForCausalLM(config)


def test_compiled_block_has_no_graph_break():
    model = _tiny_tree_lm().eval()
    block = model.transformer.h[0]
    x, positions = torch.randn(2, 8, 32), torch.arange(8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x, positions), block(x, positions),
                                   atol=1e-5, rtol=1e-5)
    explanation = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 8)))
    breaks = [str(r) for r in explanation.break_reasons if "dynsparse" in str(r)]
    assert not breaks, breaks


def test_compiled_tree_lm_matches_eager():
    model = _tiny_tree_lm().eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
