"""dynsparse convert: GPT-2, OPT and our dense LM from tiny local configs -> tree FF, reload, train --init-from."""
import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig,
                          OPTForCausalLM)

import dynsparse.lm as lm
from dynsparse.cli import main
from dynsparse.lm.convert import load_model
from dynsparse.tree import TreeFF

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(600))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2))


def opt():
    return OPTForCausalLM(OPTConfig(vocab_size=300, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32))


def ours():
    return lm.DynSparseLMForCausalLM(lm.DynSparseLMConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, max_position_embeddings=64))


def test_saving_prints_no_transformers_bar(tmp_path, capfd):
    """transformers draws a shard-writing bar on every save_pretrained; a study saving dozens of runs
    must not print one each (its own lines, or --no-progress, say what happens)."""
    from transformers.utils import logging as hf_logging

    from dynsparse.lm.convert import save_converted

    assert hf_logging.is_progress_bar_enabled()
    save_converted(ours(), tmp_path / "m")
    assert "shards" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    ours().save_pretrained(tmp_path / "plain")  # what the check would catch
    assert "shards" in capfd.readouterr().err


@pytest.mark.parametrize("make", [gpt2, opt, ours])
def test_convert_keeps_attention_and_reloads(make, tmp_path):
    torch.manual_seed(0)
    src = make().eval()
    src.save_pretrained(tmp_path / "src")
    assert main(["convert", "--model", str(tmp_path / "src"), "--depth", "3", "--trees", "2",
                 "--out", str(tmp_path / "tree")]) == 0
    model = load_model(tmp_path / "tree").eval()
    trees = [m for m in model.modules() if isinstance(m, TreeFF)]
    assert len(trees) == 2 and trees[0].depth == 3 and trees[0].trees == 2
    attn = {k: v for k, v in src.state_dict().items() if "attn" in k}
    new = model.state_dict()
    assert attn and all(torch.equal(new[k], v) for k, v in attn.items())  # pretrained attention kept
    ids = torch.randint(0, 300, (1, 8))
    again = load_model(tmp_path / "tree").eval()
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
    if make is ours:  # our own family loads through plain from_pretrained
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "tree").config.ff == "tree"


def test_convert_seed_fixes_the_trees(tmp_path):
    """The trees' initial weights come from --seed alone: equal seeds give equal models, another seed other trees
    (the fine-tuning protocol's seed spread rests on this)."""
    gpt2().save_pretrained(tmp_path / "src")
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        torch.manual_seed(len(name) * 7 + ord(name))  # the global generator's state must not matter
        assert main(["convert", "--model", str(tmp_path / "src"), "--depth", "2", "--seed", seed,
                     "--out", str(tmp_path / name)]) == 0
    a, b, c = (dict(load_model(tmp_path / n).named_parameters()) for n in "abc")
    trees = [k for k in a if ".mlp." in k]
    assert trees and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in trees if a[k].numel() > 1)


def test_train_init_from_converted_gpt2(tmp_path, capsys):
    gpt2().save_pretrained(tmp_path / "src")
    assert main(["convert", "--model", str(tmp_path / "src"), "--depth", "2", "--out", str(tmp_path / "tree")]) == 0
    (tmp_path / "c.txt").write_text(CORPUS)
    code = main(["train", "--init-from", str(tmp_path / "tree"), "--ff", "tree", "--data", str(tmp_path / "c.txt"),
                 "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--max-steps", "2",
                 "--telemetry-every", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    final = load_model(tmp_path / "run" / "final")
    assert type(final).__name__ == "GPT2LMHeadModel"
    assert sum(isinstance(m, TreeFF) for m in final.modules()) == 2
    assert (tmp_path / "run" / "telemetry.jsonl").read_text().count("transformer.h.0.mlp") == 2
    # dynsparse eval measures the trees (it once loaded the plain family, random MLPs in their place)
    for extra in ([], ["--reference", str(tmp_path / "src")]):
        assert main(["eval", str(tmp_path / "run" / "final"), "--data", str(tmp_path / "c.txt"), "--seq-len", "16",
                     "--max-windows", "4", "--cache-dir", str(tmp_path / "cache"), "--json", *extra]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["ff_active_fraction"] == pytest.approx(3 / 7)  # depth 2: 3 of 7 nodes per token
        if not extra:
            assert set(res["tree_layers"]) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}
    # prune once loaded this run as a dynsparse LM (its weights dropped with a warning), then called it dense
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "run"), "--out", str(tmp_path / "pruned")]) == 2
    assert "is a 'gpt2' model: prune handles the LMs dynsparse trains" in capsys.readouterr().err
    assert not (tmp_path / "pruned").exists()


def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


@pytest.mark.parametrize("make,tree", [(llama, False), (gpt2, True)])
def test_train_only_the_ff_blocks(make, tree, tmp_path, capsys):
    """--trainable ff: the FF blocks (dense gate/up/down or trees) move, attention, embeddings and norms do not."""
    torch.manual_seed(0)
    make().save_pretrained(tmp_path / "src")
    start = tmp_path / "src"
    if tree:
        assert main(["convert", "--model", str(start), "--depth", "2", "--out", str(tmp_path / "tree")]) == 0
        start = tmp_path / "tree"
    (tmp_path / "c.txt").write_text(CORPUS)
    code = main(["train", "--init-from", str(start), "--trainable", "ff", "--data", str(tmp_path / "c.txt"),
                 "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-2",
                 "--warmup-steps", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
                 "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    source = load_model(start)
    before = dict(source.named_parameters())
    after = dict(load_model(tmp_path / "run" / "final").named_parameters())
    ff = {k for k in before if ".mlp." in k}
    assert ff and all(not torch.equal(before[k], after[k]) for k in ff if k.endswith("weight") or ".w_" in k)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in ff)
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["trainable_params"] == sum(before[k].numel() for k in ff) < metrics["params"]


def test_convert_bad_input(tmp_path, capsys):
    assert main(["convert", "--model", str(tmp_path / "none"), "--depth", "3", "--out", str(tmp_path / "o")]) == 2
    assert "neither a directory, a file, a known name" in capsys.readouterr().err
    ours().save_pretrained(tmp_path / "src")
    assert main(["convert", "--model", str(tmp_path / "src"), "--depth", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "depth" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert main(["convert", "--model", str(tmp_path / "src"), "--depth", "3", "--out", str(tmp_path / "o")]) == 2
    assert (tmp_path / "o" / "keep.txt").exists()
