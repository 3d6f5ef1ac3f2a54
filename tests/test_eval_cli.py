"""dynsparse eval: perplexity equals a manual computation, routing-measured FF cost, speaker task, lm-eval."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dynsparse.cli import main
from dynsparse.data import prepare_tokens, text_source
from dynsparse.eval import evaluate_lm
from dynsparse.eval.harness import build_speaker_task
from dynsparse.train import TrainConfig, train

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(600))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalrun")
    (d / "c.txt").write_text(CORPUS)
    cfg = TrainConfig.build("tiny", ff="tree", d_model=32, n_layer=2, n_head=2, depth=3, trees=2, vocab_size=300,
                            seq_len=16, batch_size=4, max_steps=3, data=str(d / "c.txt"), cache_dir=str(d / "cache"))
    train(cfg, d / "run", progress=False)
    return d


def test_eval_cli_perplexity_and_measured_cost(run, capsys):
    code = main(["eval", str(run / "run" / "final"), "--data", str(run / "c.txt"), "--seq-len", "16",
                 "--max-windows", "5", "--cache-dir", str(run / "cache"), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert res["tokens"] == 5 * 16
    assert res["ff_active_fraction"] == pytest.approx(4 / 15)  # depth 3: 4 of 15 nodes per tree
    assert res["ff_flops_per_token"] == pytest.approx(2 * 2 * 4 * (32 + 32))
    # Same number by hand.
    model = AutoModelForCausalLM.from_pretrained(run / "run" / "final")
    data = prepare_tokens(text_source(str(run / "c.txt")), tokenizer_dir=str(run / "run" / "final"),
                          cache_dir=run / "cache")
    x = torch.from_numpy(data.splits["val"][: 5 * 16 + 1].astype("int64"))
    with torch.no_grad():
        logits = model(x[:-1].view(5, 16)).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[1:]).item()
    assert res["loss"] == pytest.approx(ref, rel=1e-5)


def test_evaluate_lm_keeps_training_counters(run):
    model = AutoModelForCausalLM.from_pretrained(run / "run" / "final")
    layer = model.transformer.h[0].mlp
    before = layer.leaf_visits.clone()
    ev = evaluate_lm(model, torch.arange(200).numpy() % 300, 16, max_windows=3)
    assert torch.equal(layer.leaf_visits, before) and ev.tokens == 48


def test_eval_bad_model_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a saved model directory" in capsys.readouterr().err


def test_speaker_task_files(tmp_path):
    d = build_speaker_task(tmp_path, per_play=5)  # 5 // 4 choices: one question per candidate speaker
    docs = [json.loads(l) for l in (d / "shakespeare_speaker.jsonl").read_text().splitlines()]
    assert len(docs) == 8 and {doc["play"] for doc in docs} == {"macbeth", "the-tempest"}
    for doc in docs:
        assert len(doc["choices"]) == 4 and 0 <= doc["label"] < 4
        speech = doc["choices"][doc["label"]].split(":\n", 1)[1]
        assert all(c.endswith(speech) for c in doc["choices"])  # only the speaker differs
    assert "output_type: multiple_choice" in (d / "shakespeare_speaker.yaml").read_text()


@pytest.mark.slow
def test_lm_eval_harness_on_saved_run(run, capsys):
    """lm_eval.simple_evaluate with --model hf on our saved directory, offline local task (~1-2 min)."""
    code = main(["eval", str(run / "run" / "final"), "--no-perplexity", "--tasks", "shakespeare_speaker",
                 "--limit", "4", "--cache-dir", str(run / "cache"), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = res["tasks"]["shakespeare_speaker"]["acc,none"]
    assert 0.0 <= acc <= 1.0
