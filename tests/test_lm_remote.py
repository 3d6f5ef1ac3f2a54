"""Stock tools load what dynsparse saves: every saved kind (our dense/tree LM as training and convert write
it, a converted GPT-2, a pruned tree LM) carries auto_map + modeling_dynsparse.py, and a fresh Python
that never imported dynsparse loads each with ``trust_remote_code=True`` to the same logits."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dynsparse.data.tokenizer import train_bpe
from dynsparse.dynamics.prune_run import PruneResult, _save
from dynsparse.dynamics.pruned_lm import PrunedDynSparseLMConfig, PrunedDynSparseLMForCausalLM
from dynsparse.lm import DynSparseLMConfig, DynSparseLMForCausalLM
from dynsparse.lm.convert import convert_model, save_converted
from dynsparse.lm.remote import MODELING_FILE, write_remote_code
from dynsparse.tree import TreeConfig, TreeFF, prune_static

TEXT = [f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}." for i in range(300)]
IDS = [[5, 17, 42, 7, 99, 3, 11, 64]]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT, 300)


def ours(vocab, **over):
    torch.manual_seed(0)
    cfg = DynSparseLMConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=256, **over)
    return DynSparseLMForCausalLM(cfg).eval()


def pruned_lm(vocab):
    """A tree LM whose trees were pruned to the paths a few tokens took (what `dynsparse prune` builds)."""
    model = ours(vocab, ff="tree", tree={"depth": 3, "trees": 2})
    trees = {n: m for n, m in model.named_modules() if isinstance(m, TreeFF)}
    for layer in trees.values():
        layer.track_usage(True)
    with torch.no_grad():
        model(torch.tensor(IDS))
    specs = {}
    for name, layer in trees.items():
        pruned = prune_static(layer)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, pruned)
        specs[name] = pruned.shape_spec()
    config = PrunedDynSparseLMConfig(**{**model.config.to_dict(), "pruned_layers": specs})
    config.architectures = [PrunedDynSparseLMForCausalLM.__name__]
    out = PrunedDynSparseLMForCausalLM(config).eval()
    out.load_state_dict(model.state_dict())
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """{kind: (directory, logits in this process)}, each written by dynsparse's own save path."""
    root = tmp_path_factory.mktemp("saved")
    vocab = len(tok)
    dense = ours(vocab)
    tree = ours(vocab)
    convert_model(tree, TreeConfig(depth=3, trees=2))
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    convert_model(gpt2, TreeConfig(depth=2, trees=1))
    pruned = pruned_lm(vocab)
    for name, model in (("dense", dense), ("tree", tree), ("gpt2_tree", gpt2)):
        save_converted(model, root / name, tok)
    _save(pruned, tok, root / "pruned", PruneResult(2, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        return {name: (root / name, m(ids).logits) for name, m in
                (("dense", dense), ("tree", tree), ("gpt2_tree", gpt2), ("pruned", pruned))}


def fresh_env(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"),
               HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"), TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert "dynsparse" not in sys.modules
out = {}
paths = json.loads(sys.argv[1])
try:  # without trust_remote_code the auto_map is not followed and transformers knows no dynsparse_lm
    AutoModelForCausalLM.from_pretrained(paths["dense"], trust_remote_code=False)
    out["untrusted"] = "loaded"
except ValueError as e:
    out["untrusted"] = str(e)
assert "dynsparse" not in sys.modules
for name, path in paths.items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        out[name] = [type(model).__name__, model(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()]
print(json.dumps(out))
"""


def test_each_saved_kind_names_its_code(saved):
    for name, (d, _) in saved.items():
        config = json.loads((d / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_dynsparse."), name
        assert ("AutoConfig" in config["auto_map"]) == (name != "gpt2_tree"), name  # GPT-2's config is stock
        assert "from dynsparse." in (d / MODELING_FILE).read_text(), name


def test_fresh_python_loads_every_kind_with_trust_remote_code(saved, tmp_path):
    paths = {name: str(d) for name, (d, _) in saved.items()}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", FRESH, json.dumps(paths), json.dumps(IDS)], capture_output=True,
                       text=True, env=fresh_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "trust_remote_code" in got.pop("untrusted")  # the auto_map is what makes the trusted load work
    assert got["gpt2_tree"][0] == "GPT2LMHeadModel" and got["pruned"][0] == "PrunedDynSparseLMForCausalLM"
    assert got["dense"][0] == got["tree"][0] == "DynSparseLMForCausalLM"
    for name, (_, logits) in saved.items():
        torch.testing.assert_close(torch.tensor(got[name][1]), logits, rtol=1e-5, atol=1e-5, msg=name)
    print(f"fresh-interpreter load of {len(paths)} dirs: {time.perf_counter() - t0:.1f} s")


def test_plain_hf_dirs_are_left_alone(tmp_path):
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    before = (tmp_path / "config.json").read_text()
    assert write_remote_code(tmp_path) is False
    assert (tmp_path / "config.json").read_text() == before and not (tmp_path / MODELING_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        write_remote_code(tmp_path / "missing")


@pytest.mark.slow
def test_lm_eval_cli_loads_a_saved_tree_lm(saved, tmp_path):
    from dynsparse.eval.harness import SPEAKER_TASK, build_speaker_task

    tasks = build_speaker_task(tmp_path / "task", per_play=8)
    out = tmp_path / "results"
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    cmd = [lm_eval, "--model", "hf", "--model_args", f"pretrained={saved['tree'][0]},trust_remote_code=True",
           "--tasks", SPEAKER_TASK, "--include_path", str(tasks), "--limit", "4", "--device", "cpu",
           "--batch_size", "4", "--output_path", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=fresh_env(tmp_path), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("results*.json")]
    assert results and 0.0 <= results[0]["results"][SPEAKER_TASK]["acc,none"] <= 1.0
