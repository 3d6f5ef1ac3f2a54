"""The fast decode path (dynsparse.decode) gives HF generate's greedy tokens for dense, sparse and tree
models; its compiled decode step keeps the dynsparse ops inside one graph; weight bytes are counted right;
``bench generate`` runs end to end on a tiny model."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cli_helpers import run_cli
from dynsparse.decode import DynSparseLMStatic, FastDecoder, HFStatic, cast_weights_, static_model, weight_traffic
from dynsparse.decode.generate import _decode_step
from dynsparse.gating.modules import GatedMLP, LowRankGate, SlicedMLP
from dynsparse.lm import DynSparseLMConfig, DynSparseLMForCausalLM
from dynsparse.mlps import find_mlps

VOCAB = 64
NEW = 12


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_llama(tied=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, eos_token_id=None, bos_token_id=None,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def sparse_llama():
    """Layer 0's MLP a GatedMLP (low-rank gate, about half the neurons per token), layer 1's a SlicedMLP
    keeping every other neuron."""
    model = tiny_llama()
    first, second = find_mlps(model).values()
    w1, b1, w2, b2 = first.linear_weights()
    wg, bg = first.gate_weights()
    gate = LowRankGate(32, 64, 4).requires_grad_(False)
    first.replace(GatedMLP(w1, b1, w2, b2, gate, torch.tensor(0.0), "silu", wg=wg, bg=bg))
    w1, b1, w2, b2 = second.linear_weights()
    wg, bg = second.gate_weights()
    second.replace(SlicedMLP(w1, b1, w2, b2, torch.arange(0, 64, 2), "silu", wg=wg, bg=bg))
    return model


def tree_lm(position="rope"):
    torch.manual_seed(0)
    cfg = DynSparseLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=48, ff="tree", tree={"depth": 3, "trees": 2},
                            position_embedding=position)
    return DynSparseLMForCausalLM(cfg).eval()


def cats_llama():
    """Both MLPs CATS blocks (dense gate, |silu(gate)| > 0.05 keeps about half the neurons, compensation)."""
    from dynsparse.gating.baselines import cats_mlp

    model = tiny_llama()
    for block in find_mlps(model).values():
        block.replace(cats_mlp(block, "silu", torch.tensor(0.05), torch.full((64,), 0.01)))
    return model


def lowbit_llama():
    """Both MLPs GatedMLPs with packed 3-bit low-bit gates (the C++ ``lowbit_gate_mlp`` decode op), each
    threshold at its median score on random inputs: about half the neurons per token."""
    from dynsparse.gating.lowbit import LowBitGate

    model = tiny_llama()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    for block in find_mlps(model).values():
        wg, bg = block.gate_weights()
        w1, b1, w2, b2 = block.linear_weights()
        gate = LowBitGate.fit(wg, bg, w1, b1, w2.detach().norm(dim=0), x, 3, 32, 0.5, "silu")
        assert gate.packed
        with torch.no_grad():
            threshold = gate(x).median()
        block.replace(GatedMLP(w1, b1, w2, b2, gate, threshold, "silu", wg=wg, bg=bg))
    return model


MODELS = {"dense": tiny_llama, "lowbit": lowbit_llama, "gated+sliced": sparse_llama, "cats": cats_llama, "tree-rope": tree_lm,
          "tree-learned": lambda: tree_lm("learned")}


def prompt(n=7):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(3))


def hf_tokens(model, ids, new=NEW, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, **kw)


@pytest.mark.parametrize("name", list(MODELS))
def test_eager_fast_path_gives_hf_generate_tokens(name):
    model = MODELS[name]()
    ids = prompt()
    want = hf_tokens(model, ids)
    dec = FastDecoder(model, 32, compile=False)
    assert torch.equal(dec.generate(ids, NEW), want)
    assert torch.equal(dec.generate(ids[:, :1], NEW), hf_tokens(model, ids[:, :1]))  # one-token prompt
    assert torch.equal(dec.generate(ids, NEW), want)  # a second run starts from a clean cache
    assert dec.timing["decode_tokens"] == NEW - 1 and dec.timing["decode_s"] > 0


def test_adapter_kinds():
    assert isinstance(static_model(tiny_llama(), 8), HFStatic)
    assert isinstance(static_model(tree_lm(), 8), DynSparseLMStatic)


def test_stops_after_the_end_token_like_hf():
    model = tiny_llama()
    ids = prompt()
    free = hf_tokens(model, ids)
    eos = int(free[0, ids.shape[1] + 3])  # the 4th generated token
    want = hf_tokens(model, ids, eos_token_id=eos)
    assert want.shape[1] < free.shape[1]
    dec = FastDecoder(model, 32, compile=False)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=eos), want)
    model.generation_config.eos_token_id = eos  # the default comes from the model's generation config
    assert torch.equal(dec.generate(ids, NEW), want)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=None), free)


@pytest.mark.parametrize("bad, match", [
    (lambda d: d.generate(torch.zeros(2, 3, dtype=torch.long), 2), "batch 1"),
    (lambda d: d.generate(torch.zeros(1, 3), 2), "integer tensor"),
    (lambda d: d.generate(torch.zeros(1, 3, dtype=torch.long), 0), "max_new_tokens"),
    (lambda d: d.generate(torch.zeros(1, 10, dtype=torch.long), 8), "max_len=16"),
    (lambda d: d.generate(torch.zeros(1, 3, dtype=torch.long), 2, eos_token_id="x"), "eos_token_id"),
])
def test_bad_input_is_named(bad, match):
    dec = FastDecoder(tiny_llama(), 16, compile=False)
    with pytest.raises(ValueError, match=match):
        bad(dec)


def test_unsupported_models_are_named():
    with pytest.raises(ValueError, match="max_len"):
        static_model(tiny_llama(), 3)
    with pytest.raises(ValueError, match="static KV cache"):
        static_model(torch.nn.Linear(2, 2), 8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        static_model(tree_lm(), 49)
    with pytest.raises(ValueError, match="dtype"):
        cast_weights_(tiny_llama(), "fp16")


def test_bf16_weights_except_the_sparse_kernels_tables():
    model = cast_weights_(sparse_llama(), "bf16")
    gated, sliced = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert gated.w1.dtype == gated.w2_t.dtype == gated.wg.dtype == torch.float32  # read in place by the kernels
    assert gated.gate.A.dtype == torch.float32
    assert sliced.fc1.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # non-persistent: as from_pretrained leaves it
    ids = prompt()
    out = FastDecoder(model, 32, compile=False).generate(ids, NEW)
    assert out.shape == (1, 7 + NEW)
    # the same cast model through HF's eager generate: the same greedy tokens
    assert torch.equal(out, hf_tokens(model, ids))


def test_bf16_cats_tables_are_read_as_stored():
    """CATS blocks' tables go to bf16 (the gate-skip kernels read them as stored, half the bytes); the
    threshold and compensation stay float32; decoding gives HF generate's tokens on the same cast model."""
    fp32 = cats_llama()
    model = cast_weights_(cats_llama(), "bf16")
    block = model.model.layers[0].mlp
    assert block.w1.dtype == block.w2_t.dtype == block.wg.dtype == torch.bfloat16
    assert block.threshold.dtype == block.compensation.dtype == block.b2_kernel.dtype == torch.float32
    assert weight_traffic(model).mlp < 0.55 * weight_traffic(fp32).mlp
    ids = prompt()
    out = FastDecoder(model, 32, compile=False).generate(ids, NEW)
    assert torch.equal(out, hf_tokens(model, ids))
    x = torch.randn(3, 32)
    with torch.no_grad():  # the op path and the reference read the same bf16 values
        torch.testing.assert_close(block(x), block.forward_reference(x), rtol=1e-4, atol=1e-4)


def _param_bytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


def test_weight_traffic_counts_what_a_step_reads():
    untied = tiny_llama()
    t = weight_traffic(untied)
    rotary = sum(b.numel() * 4 for b in untied.model.rotary_emb.buffers())
    embed = untied.model.embed_tokens.weight
    # every weight once, the untied input table one row
    assert t.total == _param_bytes(untied) - embed.numel() * 4 + embed.shape[1] * 4 + rotary
    assert t.mlp == sum(_param_bytes(b.owner) for b in find_mlps(untied).values()) == 2 * 3 * 32 * 64 * 4
    tied = tiny_llama(tied=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert weight_traffic(tied).total == _param_bytes(tied) + rotary  # the head reads the shared table once
    sparse = sparse_llama()
    gated = sparse.model.layers[0].mlp
    gated.computed, gated.total = 30, 64 * 3  # as if 3 tokens computed 10 neurons each
    s = weight_traffic(sparse)
    gate = (32 * 4 + 4 * 64 + 64) * 4
    rows = 10 * (32 + 32 + 32) * 4  # w1, wg and w2_t rows of the computed neurons
    sliced = 3 * 32 * 32 * 4 + 32 * 4  # every other neuron; fc2's bias
    assert gated.b2_kernel is None  # no bias, no compensation
    assert s.mlp == pytest.approx(gate + 4 + rows + sliced)  # + the threshold
    assert s.other == pytest.approx(t.other)
    assert s.notes == []
    # a measured density given by the caller wins over the counters
    assert weight_traffic(sparse, {"model.layers.0.mlp": 0.5}).mlp == pytest.approx(gate + 4 + 32 * 96 * 4 + sliced)
    from dynsparse.gating.baselines import cats_mlp

    cats = tiny_llama()
    block = find_mlps(cats)["model.layers.0.mlp"]
    block.replace(cats_mlp(block, "silu", torch.tensor(0.1), None))
    c = weight_traffic(cats, {"model.layers.0.mlp": 0.25})
    dense_gate = 64 * 32 * 4  # the whole gate projection, then 16 kept neurons' rows of w1 and w2_t
    assert c.mlp == pytest.approx(dense_gate + 4 + 16 * 64 * 4 + 3 * 32 * 64 * 4)
    tree = tree_lm()
    layer = tree.transformer.h[0].mlp
    share = 4 / 15  # depth 3: 4 of 15 nodes per tree
    routed = sum(p.numel() * 4 for p in (layer.w_in, layer.b_in, layer.w_out))
    assert weight_traffic(tree).mlp == pytest.approx(2 * (share * routed + (_param_bytes(layer) - routed)))


def _graphs_and_breaks(model):
    static = static_model(model, 16)
    token, position = torch.zeros(1, 1, dtype=torch.long), torch.tensor([3])
    # what fullgraph=True (FastDecoder's setting) implies: ops whose output size depends on the data (the
    # gate's index lists) are captured instead of breaking the graph
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
        explanation = torch._dynamo.explain(_decode_step)(static, token, position)
    code = "\n".join(g.code for g in explanation.graphs)
    return explanation, code


@pytest.mark.parametrize("name, ops", [("gated+sliced", ("lowrank_gate_indices", "sparse_mlp")),
                                       ("lowbit", ("lowbit_gate_mlp",)),
                                       ("cats", ("gate_skip_mlp",)), ("tree-rope", ("tree_infer",))])
def test_decode_step_traces_as_one_graph_with_the_dynsparse_ops(name, ops):
    explanation, code = _graphs_and_breaks(MODELS[name]())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    for op in ops:
        assert f"dynsparse.{op}" in code or f"dynsparse::{op}" in code or op in code, op


@pytest.mark.parametrize("build", [sparse_llama, cats_llama])
def test_compiled_decode_step_gives_hf_generate_tokens(build):
    """torch.compile (inductor) of the decode step of a model with a GatedMLP and a SlicedMLP, or with CATS
    blocks: the same greedy tokens as HF's eager generate, one compile serving every position."""
    model = build()
    ids = prompt()
    want = hf_tokens(model, ids)
    dec = FastDecoder(model, 32, compile_prefill=False)
    assert torch.equal(dec.generate(ids, NEW), want)
    assert dec.compiled == {"decode": True, "prefill": False} and dec.fallback == {}
    assert dec.compile_seconds["decode"] > 0
    assert torch.equal(dec.generate(ids, NEW), want)


@pytest.mark.parametrize("build", [lowbit_llama, sparse_llama])
def test_compiled_gated_prefill_and_decode_give_hf_generate_tokens(build):
    """GatedMLP counts its neurons in int attributes, inside compiled graphs too. A prefill graph (16 tokens
    or more: the low-bit block's masked dense reference, the low-rank block's index lists) must take them as
    inputs, or each call changes a guarded value and recompiles until fullgraph fails. Both steps give HF
    generate's tokens, and once a length's graph is built, later generations compile nothing."""
    from torch._dynamo.utils import counters

    model = build()
    ids = prompt(17)
    want = hf_tokens(model, ids)
    dec = FastDecoder(model, 32)
    assert torch.equal(dec.generate(ids, NEW), want)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(3):
        assert torch.equal(dec.generate(ids, NEW), want)
    assert counters["stats"]["unique_graphs"] == graphs
    assert dec.compiled == {"decode": True, "prefill": True} and dec.fallback == {}


def test_compile_failure_falls_back_to_eager_with_one_line():
    model = tiny_llama()
    messages = []
    dec = FastDecoder(model, 32, compile=True, warn=messages.append)

    def broken(*args):
        raise RuntimeError("simulated inductor failure\nwith a second line")

    dec._fns["decode"] = dec._fns["prefill"] = broken
    ids = prompt()
    assert torch.equal(dec.generate(ids, NEW), hf_tokens(model, ids))
    assert dec.compiled == {"decode": False, "prefill": False}
    assert len(messages) == 2 and all("\n" not in m and "running it eagerly" in m for m in messages)
    assert "simulated inductor failure with a second line" in dec.fallback["decode"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "tree-rope"])
def test_compiled_prefill_and_decode_give_hf_generate_tokens(name):
    model = MODELS[name]()
    ids = prompt()
    dec = FastDecoder(model, 32)
    assert torch.equal(dec.generate(ids, NEW), hf_tokens(model, ids))
    assert dec.compiled == {"decode": True, "prefill": True} and dec.fallback == {}
    longer = prompt(11)  # another prompt length: a graph of its own
    assert torch.equal(dec.generate(longer, NEW), hf_tokens(model, longer))
    assert set(dec.prefill_graphs) == {7, 11}


# ------------------------------------------------------------------------------------------ the bench
@pytest.fixture
def tiny_dirs(tmp_path):
    """A saved tiny Llama and a SIBS directory for it written as ``dynsparse sparsify`` writes one (gates
    fitted on the base model, the block names of ``AutoModel``)."""
    from dynsparse.gating import SIBSConfig, fit_gates, save_sparsified_dir

    model = tiny_llama(tied=True)
    model_dir = tmp_path / "llama"
    model.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=g)} for _ in range(4)]
    gates = fit_gates(model.model, SIBSConfig(target_sparsity=0.5), calib)
    assert set(gates.layers) == {"layers.0.mlp", "layers.1.mlp"}
    sparse_dir = save_sparsified_dir(gates, tmp_path / "sibs50", model_dir)
    return model_dir, sparse_dir


def _bench(model_dir, *extra):
    outcome = run_cli(["bench", "generate", "--model", str(model_dir), "--json", "--tokens", "4", "--prefill", "8,16",
                       "--repeats", "1", "--copy-megabytes", "8", *extra], timeout_s=600)
    assert outcome.kind == "ok", outcome.err[-2000:]
    return json.loads(outcome.out)


def _check_rows(report, dtypes, compiled):
    rows = report["rows"]
    assert report["machine"]["threads"] == 2 and len(report["machine"]["load_average_start"]) == 3
    for dtype in dtypes:
        mine = {(r["kind"], r["path"].startswith("hf"), r.get("linears")): r for r in rows if r["dtype"] == dtype}
        assert set(mine) == {("dense", False, "gemv"), ("dense", False, "torch"), ("no_mlp", False, "gemv"),
                             ("sparse", False, "gemv"), ("dense", True, None), ("no_mlp", True, None)}
        dense, sparse = mine[("dense", False, "gemv")], mine[("sparse", False, "gemv")]
        plain = mine.pop(("dense", False, "torch"))  # the same model on torch's own F.linear, for reference
        assert dense["path"] == ("compiled" if compiled else "eager")
        assert plain["path"] == dense["path"] + ", torch linears" and "decode_mlp_s_per_token" not in plain
        assert plain["weight_bytes_per_token"] == dense["weight_bytes_per_token"]
        mine = {k[:2]: r for k, r in mine.items()}
        for r in mine.values():
            assert r["decode_tokens_per_s"] > 0 and set(r["prefill_tokens_per_s"]) == {"8", "16"}
        for r in (dense, sparse, mine[("dense", True)]):
            assert r["decode_mlp_s_per_token"] + r["decode_other_s_per_token"] == pytest.approx(r["decode_s_per_token"])
            assert set(r["prefill_mlp_share"]) == {"8", "16"}
        for r in (dense, sparse):
            assert r["copy_gbps"] > 0 and r["read_gbps"] > 0 and r["kv_bytes_per_step"] > 0
            assert r["achieved_gbps"] == pytest.approx(r["weight_bytes_per_token"] * r["decode_tokens_per_s"] / 1e9)
            assert r["limit_tokens_per_s"] == pytest.approx(r["copy_gbps"] * 1e9 / r["weight_bytes_per_token"])
        assert isinstance(dense["met"], bool) and isinstance(sparse["met"], bool)
        # SIBS at 50 %: half of every MLP's rows, the attention and the tied head unchanged
        assert sparse["mlp_bytes_per_token"] < 0.55 * dense["mlp_bytes_per_token"]
        assert sparse["mlp_active_fraction"] == pytest.approx(0.5)  # measured: 32 of 64 neurons per token
        assert sparse["allowed_speedup"] == pytest.approx(dense["weight_bytes_per_token"] / sparse["weight_bytes_per_token"])
        assert sparse["share_of_allowed_speedup"] == pytest.approx(sparse["speedup_vs_dense"] / sparse["allowed_speedup"])
        if dtype == "fp32":
            assert dense["agrees_with_hf_tokens"] == 4  # the fast path's greedy tokens are HF generate's
            assert plain["agrees_with_hf_tokens"] == 4
    return rows


def test_bench_generate_json_on_a_tiny_model(tiny_dirs):
    model_dir, sparse_dir = tiny_dirs
    report = _bench(model_dir, "--dtype", "fp32", "--no-compile", "--sparsify", str(sparse_dir))
    rows = _check_rows(report, ["fp32"], compiled=False)
    from dynsparse.bench.generate import to_markdown

    table = to_markdown(report).splitlines()
    assert len(table) == 2 + len(rows) + 2 and table[2].startswith("| dense | fp32 | eager |")


def test_bench_generate_linears_torch_times_every_variant_on_f_linear(tiny_dirs):
    model_dir, sparse_dir = tiny_dirs
    report = _bench(model_dir, "--dtype", "fp32", "--no-compile", "--no-hf", "--linears", "torch",
                    "--sparsify", str(sparse_dir))
    rows = report["rows"]
    assert {r["kind"] for r in rows} == {"dense", "no_mlp", "sparse"} and len(rows) == 3  # no second dense row
    assert all(r["linears"] == "torch" and r["path"] == "eager, torch linears" for r in rows)
    assert report["settings"]["linears"] == "torch"


def test_bench_generate_a_converted_tree_model(tiny_dirs, tmp_path):
    """--converted: the same model with trees for MLPs, through the same loop, its speed-up and byte ratio
    against the dense row."""
    from dynsparse.lm.convert import convert_model, load_model, save_converted
    from dynsparse.tree import TreeConfig

    model_dir, _ = tiny_dirs
    tree = load_model(model_dir)
    convert_model(tree, TreeConfig(depth=3, trees=2))
    save_converted(tree, tmp_path / "tree")
    report = _bench(model_dir, "--dtype", "fp32", "--no-compile", "--no-hf", "--converted", str(tmp_path / "tree"))
    rows = {r["kind"]: r for r in report["rows"] if r["linears"] == "gemv"}  # (the dense one also on "torch")
    assert set(rows) == {"dense", "no_mlp", "converted"}
    dense, conv = rows["dense"], rows["converted"]
    assert conv["variant"] == "converted: tree" and conv["mlp_active_fraction"] == pytest.approx(4 / 15)
    assert conv["allowed_speedup"] == pytest.approx(dense["weight_bytes_per_token"] / conv["weight_bytes_per_token"])
    assert conv["speedup_vs_dense"] == pytest.approx(dense["decode_s_per_token"] / conv["decode_s_per_token"])


@pytest.mark.slow
def test_bench_generate_compiled_bf16(tiny_dirs):
    model_dir, sparse_dir = tiny_dirs
    report = _bench(model_dir, "--dtype", "bf16", "--sparsify", str(sparse_dir))
    rows = _check_rows(report, ["bf16"], compiled=True)
    assert all(r["compile_s"]["decode"] > 0 for r in rows if "compile_s" in r)


def test_bench_generate_bad_input_is_one_line(tmp_path):
    for argv, words in ([["bench", "generate"], "--model"],
                        [["bench", "generate", "--model", str(tmp_path), "--dtype", "fp16"], "--dtype"],
                        [["bench", "generate", "--model", str(tmp_path), "--tokens", "1,2"], "--tokens"],
                        [["bench", "generate", "--model", str(tmp_path), "--sparsify", str(tmp_path)], "gates.safetensors"],
                        [["bench", "generate", "--model", str(tmp_path), "--converted", str(tmp_path)], "--converted"]):
        outcome = run_cli(argv)
        assert outcome.kind == "clear", (argv, outcome.err)
        assert words in outcome.error_lines[0]
