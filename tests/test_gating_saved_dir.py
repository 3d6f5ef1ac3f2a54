"""A sparsified causal LM saves as a directory (dense files + gates + auto_map) that a fresh Python,
which never imported dynsparse, reloads with stock transformers to the same logits; dynsparse's own
loader reads it without running the folder's code; bad input gets one line."""
import json
import subprocess
import sys

import pytest
import torch
from test_lm_remote import fresh_env
from transformers import LlamaConfig, LlamaForCausalLM

from dynsparse.gating import (
    CATSConfig,
    GatedMLP,
    MGSConfig,
    SIBSConfig,
    apply_gates,
    fit_gates,
    load_gates,
    save_sparsified_dir,
    sparsify_,
)
from dynsparse.gating.api import is_sparsified_dir, load_sparsified
from dynsparse.lm.remote import MODELING_FILE
from dynsparse.remote_code import check_remote_code

VOCAB = 60
IDS = [[3, 17, 42, 7, 11, 5, 29, 8, 50, 1]]


def tiny_llama_lm(hidden=32, layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def calib(n=8):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=g)} for _ in range(n)]


CONFIGS = {
    "mgs": MGSConfig(target_sparsity=0.5, activity="contribution", steps=20, min_samples=32),
    "mgs_grouped": MGSConfig(gate="grouped", group_size=8, target_sparsity=0.5, activity="contribution", steps=20,
                             min_samples=32),
    "sibs": SIBSConfig(target_sparsity=0.3, activity="contribution"),
    "cats": CATSConfig(target_sparsity=0.5, compensate=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{method: (directory, logits of the sparsified model in this process)}."""
    root = tmp_path_factory.mktemp("sparsified")
    dense_dir = root / "dense"
    tiny_llama_lm().save_pretrained(dense_dir)
    out = {}
    for name, cfg in CONFIGS.items():
        model = tiny_llama_lm()
        gates = sparsify_(model, cfg, calib(), progress=False)
        save_sparsified_dir(gates, root / name, dense_dir)
        with torch.no_grad():
            out[name] = (root / name, model(torch.tensor(IDS)).logits)
    return out


FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "dynsparse" not in sys.modules
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    mlp = type(model.model.layers[0].mlp).__name__
    with torch.no_grad():
        out[name] = [type(model).__name__, mlp, model(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()]
print(json.dumps(out))
"""


def test_fresh_python_reloads_every_method_to_the_same_logits(saved, tmp_path):
    paths = {name: str(d) for name, (d, _) in saved.items()}
    r = subprocess.run([sys.executable, "-c", FRESH, json.dumps(paths), json.dumps(IDS)], capture_output=True,
                       text=True, env=fresh_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    expected_mlp = {"mgs": "GatedMLP", "mgs_grouped": "GatedMLP", "sibs": "SlicedMLP", "cats": "CATSMLP"}
    for name, (_, logits) in saved.items():
        assert got[name][0] == "LlamaForCausalLM" and got[name][1] == expected_mlp[name], name
        torch.testing.assert_close(torch.tensor(got[name][2]), logits, rtol=1e-5, atol=1e-5, msg=name)
    dense = tiny_llama_lm()
    with torch.no_grad():
        assert not torch.allclose(dense(torch.tensor(IDS)).logits, saved["mgs"][1], atol=1e-4)  # really sparsified


def test_dynsparse_loads_the_directory_itself_without_trusting_its_code(saved):
    for name, (d, logits) in saved.items():
        config = json.loads((d / "config.json").read_text())
        assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_dynsparse.SparsifiedForCausalLM"}
        assert (d / MODELING_FILE).is_file() and is_sparsified_dir(d)
        assert check_remote_code(d, False) is False  # ours: dynsparse never runs the folder's file
        model = load_sparsified(d)
        with torch.no_grad():
            torch.testing.assert_close(model(torch.tensor(IDS)).logits, logits, rtol=1e-5, atol=1e-5)
    # a foreign auto_map, or another modeling file, beside a gate file is still refused
    d = saved["mgs"][0]
    config = json.loads((d / "config.json").read_text())
    source = (d / MODELING_FILE).read_text()
    (d / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    try:
        with pytest.raises(ValueError, match="asks to run its own Python code"):
            check_remote_code(d, False)
    finally:
        (d / "config.json").write_text(json.dumps(config))
    (d / MODELING_FILE).write_text(source + "import os\n")
    try:
        with pytest.raises(ValueError, match="asks to run its own Python code"):
            check_remote_code(d, False)
    finally:
        (d / MODELING_FILE).write_text(source)
    assert check_remote_code(d, False) is False


def test_gates_of_a_base_model_apply_to_its_causal_lm_and_back():
    from transformers import LlamaModel

    lm = tiny_llama_lm()
    base = LlamaModel(lm.config).eval()
    base.load_state_dict(lm.model.state_dict())
    gates = fit_gates(base, CONFIGS["cats"], calib(), progress=False)  # named "layers.0.mlp", as sparsify writes
    assert set(gates.layers) == {"layers.0.mlp", "layers.1.mlp"}
    apply_gates(lm, gates, backend="reference")
    apply_gates(base, gates, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(torch.tensor(IDS)).last_hidden_state, base(torch.tensor(IDS)).last_hidden_state)
    lm_gates = fit_gates(tiny_llama_lm(), CONFIGS["cats"], calib(), progress=False)
    assert set(lm_gates.layers) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    fresh_base = LlamaModel(lm.config).eval()
    apply_gates(fresh_base, lm_gates)
    assert type(fresh_base.layers[1].mlp).__name__ == "CATSMLP"


def test_bad_input_is_one_line(tmp_path, saved):
    # a model without MLP blocks
    for cfg in CONFIGS.values():
        with pytest.raises(ValueError, match="no recognisable MLP blocks"):
            fit_gates(torch.nn.Sequential(torch.nn.Linear(4, 4)), cfg, [torch.zeros(1, 4)])
    # gates saved for another model
    other = tiny_llama_lm(hidden=16)
    with pytest.raises(ValueError, match="does not match the model") as e:
        load_gates(other, saved["mgs"][0])
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, GatedMLP) for m in other.modules())
    three = tiny_llama_lm(layers=3)
    with pytest.raises(ValueError, match="does not match"):
        apply_gates(tiny_llama_lm(hidden=16), fit_gates(three, CONFIGS["cats"], calib(), progress=False))
    # target sparsity outside [0, 1)
    for bad in (1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"must be .*\[0, 1\)") as e:
            MGSConfig(target_sparsity=bad, activity="contribution")
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            SIBSConfig(target_sparsity=bad)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            CATSConfig(target_sparsity=bad)
    with pytest.raises(ValueError, match="not a sparsified model directory"):
        load_sparsified(tmp_path)


@pytest.mark.slow
def test_lm_eval_cli_scores_a_sparsified_llama(tmp_path):
    """The stock ``lm_eval`` CLI, in a fresh process, scores a sparsified directory (CATS on a tiny Llama with a
    real tokenizer) through its auto_map; every scored document gets responses."""
    import os

    from test_lm_remote import TEXT

    from dynsparse.data.tokenizer import train_bpe
    from dynsparse.eval.harness import SPEAKER_TASK, build_speaker_task

    tok = train_bpe(TEXT, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    dense_dir = tmp_path / "dense"
    model.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    batches = [{"input_ids": tok(text, return_tensors="pt")["input_ids"]} for text in TEXT[:16]]
    gates = sparsify_(model, CONFIGS["cats"], batches, progress=False)
    save_sparsified_dir(gates, tmp_path / "cats", dense_dir)
    tasks = build_speaker_task(tmp_path / "task", per_play=8)
    out = tmp_path / "results"
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    cmd = [lm_eval, "--model", "hf", "--model_args", f"pretrained={tmp_path / 'cats'},trust_remote_code=True",
           "--tasks", SPEAKER_TASK, "--include_path", str(tasks), "--limit", "4", "--device", "cpu",
           "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=fresh_env(tmp_path), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("results*.json")]
    assert results and 0.0 <= results[0]["results"][SPEAKER_TASK]["acc,none"] <= 1.0
    samples = [json.loads(line) for p in out.rglob("samples*.jsonl") for line in p.read_text().splitlines()]
    assert len(samples) == 4 and all(s["resps"] for s in samples)
