"""Llama-family conversion to trees (reload through stock transformers, generate) and layer-wise
distillation of each tree to its dense SwiGLU MLP, on a tiny Llama config."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import dynsparse.tree.layer as tree_layer
from dynsparse.cli import main
from dynsparse.lm.convert import check_convertible, check_tree_memory, load_model
import dynsparse.lm.distill as distill
from dynsparse import lm
from dynsparse.lm.distill import DistillConfig, convert_distilled, decoder_layers, dense_forward, record_inputs
from dynsparse.mlps import find_mlps
from dynsparse.tree import TreeConfig, TreeFF

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(600))


def llama(vocab=300, layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).eval()


def test_recorded_inputs_and_dense_outputs_are_the_blocks_own():
    model = llama()
    ids = torch.randint(0, 300, (3, 10))
    blocks = find_mlps(model)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, (a[0].reshape(-1, 16), out.reshape(-1, 16)))) for n in blocks]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    rec = record_inputs(model, blocks, ids, batch=2)  # two batches, concatenated in order
    for name, block in blocks.items():
        # batches of 2 vs one of 3: BLAS may pick other kernels by shape (seen: 3e-8 apart on an AVX-512 CPU)
        torch.testing.assert_close(rec[name], seen[name][0], rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(dense_forward(block, rec[name]), seen[name][1])


def test_distillation_fits_each_layer_through_the_training_op(monkeypatch):
    model = llama()
    calls = []
    real = tree_layer.tree_train
    monkeypatch.setattr(tree_layer, "tree_train", lambda *a: calls.append(a[-1]) or real(*a))
    ids = torch.randint(0, 300, (8, 32))
    ref = {n: b for n, b in find_mlps(model).items()}
    x_all = record_inputs(model, ref, ids)
    replaced, reports = convert_distilled(model, TreeConfig(depth=2, trees=4), ids,
                                          DistillConfig(steps=150, lr=1e-2, batch_tokens=128))
    assert replaced == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [r["layer"] for r in reports] == replaced
    assert len(calls) == 2 * 150 and set(calls) == {"auto"}  # the gather training path, backend auto
    for r in reports:
        assert r["heldout_tokens"] == 26 and r["train_tokens"] == 230
        assert r["rel_error"] < 0.6 * r["rel_error_init"]
    # The reported error is the installed tree's, measured against the dense block (held-out + train rows).
    for name, r in zip(replaced, reports):
        tree = model.get_submodule(name)
        assert isinstance(tree, TreeFF) and not tree.training
        with torch.no_grad():
            err = torch.linalg.vector_norm(tree(x_all[name]) - dense_forward(ref[name], x_all[name])) / \
                torch.linalg.vector_norm(dense_forward(ref[name], x_all[name]))
        assert min(r["rel_error"], r["rel_error_train"]) - 0.05 < float(err) < max(r["rel_error"], r["rel_error_train"]) + 0.05


def ours(layers=3):
    torch.manual_seed(0)
    return lm.DynSparseLMForCausalLM(lm.DynSparseLMConfig(vocab_size=300, hidden_size=16, num_hidden_layers=layers,
                                                          num_attention_heads=2, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("family", ["llama", "ours"])
def test_sequential_distillation_fits_each_tree_on_the_inputs_it_will_see(family, monkeypatch):
    """Each tree is fitted on what the converted model feeds it (the trees before it in place), against the
    dense block applied to those inputs; the first layer's inputs are the dense model's own."""
    model = llama(layers=3) if family == "llama" else ours()
    ids = torch.randint(0, 300, (6, 24))
    dense_inputs = record_inputs(model, find_mlps(model), ids)
    fitted = {}
    real = distill.distill_layer

    def spy(tree, x, y, cfg):
        fitted[len(fitted)] = (x.clone(), y.clone())
        return real(tree, x, y, cfg)

    monkeypatch.setattr(distill, "distill_layer", spy)
    blocks = find_mlps(model)
    replaced, reports = convert_distilled(model, TreeConfig(depth=2, trees=4), ids,
                                          DistillConfig(steps=60, lr=1e-2, batch_tokens=64, inputs="sequential"))
    assert [r["layer"] for r in reports] == replaced == list(blocks)
    trees = {n: model.get_submodule(n) for n in replaced}
    assert all(isinstance(t, TreeFF) and not t.training for t in trees.values())
    seen = {n: [] for n in trees}
    hooks = [t.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, 16))) for n, t in trees.items()]
    with torch.no_grad():
        model(ids[:3]), model(ids[3:])
    for h in hooks:
        h.remove()
    for i, name in enumerate(replaced):
        x, y = fitted[i]
        torch.testing.assert_close(x, torch.cat(seen[name]), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(y, dense_forward(blocks[name], x), rtol=1e-5, atol=1e-5)
        assert reports[i]["rel_error"] < reports[i]["rel_error_init"]
    torch.testing.assert_close(fitted[0][0], dense_inputs[replaced[0]])  # nothing before layer 0 changed
    assert not torch.allclose(fitted[1][0], dense_inputs[replaced[1]], atol=1e-3)  # layer 0's tree did


def test_balanced_start_halves_every_nodes_tokens():
    torch.manual_seed(0)
    tree = TreeFF(d_model=16, depth=3, trees=2, activation="silu")
    x = torch.randn(800, 16) * torch.linspace(0.1, 3, 16)  # anisotropic, as hidden states are
    distill.balanced_start(tree, x, seed=0)
    tree.track_usage(True)
    with torch.no_grad():
        tree.eval()(x)
    visits = tree.usage_stats().node_visits
    for n in range(7):  # every internal node splits its tokens at their median: the kernel's rounding moves only
        # the tokens at the median across, and the ones it moved reach their subtree's nodes as extras
        assert visits[:, 2 * n + 1].add(visits[:, 2 * n + 2]).equal(visits[:, n])
        assert ((visits[:, 2 * n + 1] - visits[:, 2 * n + 2]).abs() <= 0.05 * visits[:, n] + 1).all(), visits
    assert visits[:, 7:].min() >= 90 and visits[:, 7:].max() <= 110  # 800 / 8 leaves; random w_in starves some
    # distillation from that start: the reported initial error is the balanced tree's, and the fit improves on it
    model = llama()
    ids = torch.randint(0, 300, (4, 32))
    _, reports = convert_distilled(model, TreeConfig(depth=2, trees=4), ids,
                                   DistillConfig(steps=40, lr=1e-2, batch_tokens=64, start="balanced"))
    _, plain = convert_distilled(llama(), TreeConfig(depth=2, trees=4), ids, DistillConfig(steps=40, lr=1e-2, batch_tokens=64))
    assert all(r["rel_error"] < r["rel_error_init"] for r in reports)
    assert [r["rel_error_init"] for r in reports] != [r["rel_error_init"] for r in plain]


def test_sequential_distillation_needs_a_list_of_decoder_layers():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = llama().model.layers[0].mlp

    with pytest.raises(ValueError, match="needs each MLP block inside a list of decoder layers; block is in none"):
        decoder_layers(Wrapper(), find_mlps(Wrapper()))
    with pytest.raises(ValueError, match="distillation inputs must be one of dense, sequential, got 'chained'"):
        DistillConfig(inputs="chained").check()
    with pytest.raises(ValueError, match="distillation start must be one of random, balanced, got 'median'"):
        DistillConfig(start="median").check()


def test_a_calibration_set_that_cannot_fit_is_refused_before_recording(monkeypatch):
    # SmolLM2's shape on the whole Shakespeare train split (about 1.5 M tokens) on a 24 GiB machine
    with pytest.raises(ValueError, match=r"--calib-tokens 1,500,000: distilling on dense inputs holds about 96.6 GiB "
                       r"of recorded inputs, more than the 24.0 GiB .* sequential holds about 12.9 GiB"):
        distill.check_memory(30, 1_500_000, 576, "dense", available=24 * 2**30)
    distill.check_memory(30, 1_500_000, 576, "sequential", available=24 * 2**30)  # fits
    distill.check_memory(30, 65_536, 576, "dense", available=24 * 2**30)
    recorded = []
    monkeypatch.setattr(distill, "available_bytes", lambda: 2**16)
    monkeypatch.setattr(distill, "record_inputs", lambda *a, **k: recorded.append(1))
    with pytest.raises(ValueError, match="more than the 0.0 GiB of memory available"):
        convert_distilled(llama(), TreeConfig(depth=2), torch.zeros(64, 32, dtype=torch.long))
    assert not recorded


def test_trees_that_cannot_fit_are_refused_before_they_are_built():
    smollm2 = {f"layers.{i}.mlp": SimpleNamespace(d_model=576) for i in range(30)}  # 30 blocks of width 576
    with pytest.raises(ValueError, match=r"--depth 20 --trees 1: 2,097,151 units per block x 30 blocks hold about "
                       r"270.2 GiB of tree weights, more than the 24.0 GiB"):
        check_tree_memory(smollm2, TreeConfig(depth=20), available=24 * 2**30)
    check_tree_memory(smollm2, TreeConfig(depth=7, trees=16), available=24 * 2**30)  # 0.5 GiB


def test_convert_bad_shapes_are_one_line():
    model = llama()
    with pytest.raises(ValueError, match=r"--depth 0: a depth-0 tree uses 100% of its units per token"):
        check_convertible(model, TreeConfig(depth=0, trees=4))
    with pytest.raises(ValueError, match="no MLP blocks found in Sequential"):
        check_convertible(nn.Sequential(nn.Linear(4, 4)), TreeConfig(depth=2))
    bad = llama()
    bad.model.layers[1].mlp.down_proj = nn.Linear(40, 8, bias=False)  # no longer in -> hidden -> in
    with pytest.raises(ValueError, match="found 1 MLP blocks in LlamaForCausalLM with 2 layers"):
        check_convertible(bad, TreeConfig(depth=2))
    bad = llama()
    bad.model.layers[0].mlp.gate_proj = nn.Linear(16, 30, bias=False)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp: gate_proj \(30, 16\) and up_proj \(40, 16\)"):
        check_convertible(bad, TreeConfig(depth=2))
    with pytest.raises(ValueError, match="--depth 25: at most 24"):
        check_convertible(model, TreeConfig(depth=25))
    with pytest.raises(ValueError, match="distillation needs calibration tokens"):
        convert_distilled(llama(), TreeConfig(depth=2), torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="distillation steps must be an int >= 1"):
        convert_distilled(llama(), TreeConfig(depth=2), torch.zeros(2, 8, dtype=torch.long), DistillConfig(steps=0))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny Llama saved with a BPE trained on the corpus (so calibration text can be tokenized)."""
    from dynsparse.data import prepare_tokens, text_source

    d = tmp_path_factory.mktemp("llama")
    (d / "c.txt").write_text(CORPUS)
    data = prepare_tokens(text_source(str(d / "c.txt")), vocab_size=300, cache_dir=d / "cache")
    llama(vocab=len(data.tokenizer)).save_pretrained(d / "src")
    data.tokenizer.save_pretrained(d / "src")
    return d


def test_cli_convert_distill_saves_reloads_and_generates(src, tmp_path, capsys):
    out = tmp_path / "tree"
    code = main(["convert", "--model", str(src / "src"), "--depth", "2", "--trees", "4", "--activation", "silu",
                 "--init", "distill", "--calib-data", str(src / "c.txt"), "--calib-tokens", "512",
                 "--calib-seq-len", "32", "--distill-steps", "40", "--distill-batch", "128",
                 "--cache-dir", str(src / "cache"), "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "distilling 4 x depth-2 trees on 512 calibration tokens (16 x 32), 40 steps per layer, inputs dense, start random" in text.out
    assert "replaced 2 MLP blocks (d_ff 40) with depth-2 x 4 trees (28 units, 12 active per token" in text.out
    assert "recording block inputs: 4/4 batches" in text.err  # the recording pass reports its progress
    report = json.loads((out / "distill.json").read_text())
    assert report["inputs"] == "dense"
    assert [r["layer"] for r in report["layers"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for r in report["layers"]:
        assert f"{r['layer']}: relative output error {r['rel_error_init']:.3f} -> {r['rel_error']:.3f}" in text.out
        assert r["rel_error"] < r["rel_error_init"]
    model = load_model(out).eval()
    assert all(isinstance(layer.mlp, TreeFF) and layer.mlp.activation == "silu" for layer in model.model.layers)
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    # A fresh Python that never imported dynsparse loads it with stock transformers and generates the same.
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): l = m(ids).logits\n"
        "print(type(m).__name__, torch.save(l, sys.argv[1]), m.generate(ids, max_new_tokens=5, do_sample=False).tolist())\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "l.pt")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == "LlamaForCausalLM"
    assert json.loads(res.stdout.split(" ", 2)[2]) == gen.tolist()
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), logits)


def test_cli_convert_distill_sequential(src, tmp_path, capsys):
    out = tmp_path / "tree"
    code = main(["convert", "--model", str(src / "src"), "--depth", "2", "--trees", "4", "--init", "distill",
                 "--distill-inputs", "sequential", "--distill-start", "balanced", "--calib-data", str(src / "c.txt"), "--calib-tokens", "256",
                 "--calib-seq-len", "32", "--distill-steps", "20", "--cache-dir", str(src / "cache"), "--out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "20 steps per layer, inputs sequential, start balanced" in text.out
    assert "sequential distillation passes: 8/8 layer-batches" in text.err  # 2 layers x 2 batches, twice
    assert "recording block inputs" not in text.err
    report = json.loads((out / "distill.json").read_text())
    assert report["inputs"] == "sequential" and report["start"] == "balanced" and len(report["layers"]) == 2
    assert all(isinstance(layer.mlp, TreeFF) for layer in load_model(out).model.layers)


def test_cli_convert_bad_input(src, tmp_path, capsys):
    def err(*argv):
        assert main(["convert", "--model", str(src / "src"), "--out", str(tmp_path / "o"), *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert "a depth-0 tree uses 100% of its units per token" in err("--depth", "0", "--trees", "8")
    assert "--calib-tokens, --distill-steps only apply with --init distill" in err(
        "--depth", "2", "--calib-tokens", "64", "--distill-steps", "3")
    assert "--distill-inputs only apply with --init distill" in err("--depth", "2", "--distill-inputs", "sequential")
    assert "--calib-tokens must be" in err("--depth", "2", "--init", "distill", "--calib-tokens", "0")
    (tmp_path / "one.txt").write_text("x")
    assert "no calibration tokens to speak of (2 in its train split); distillation needs at least 32" in err(
        "--depth", "2", "--init", "distill", "--calib-data", str(tmp_path / "one.txt"), "--cache-dir", str(src / "cache"))
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt" in err("--depth", "2", "--init", "distill", "--calib-data", str(tmp_path / "empty.txt"),
                              "--cache-dir", str(src / "cache"))
    assert not (tmp_path / "o").exists()
