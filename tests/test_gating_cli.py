"""The sparsification commands on a tiny Llama with its own tokenizer: analyze/sparsify take --activity,
sparsify --method cats works, eval compares a sparsified folder with its dense original (perplexity
increase and KL), and bad input gets one line before any work."""
import json

import pytest
import torch
from cli_helpers import CORPUS, run_cli
from transformers import LlamaConfig, LlamaForCausalLM

from dynsparse.data.tokenizer import train_bpe


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("gating-cli")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    tok = train_bpe(CORPUS.splitlines(), 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).eval().save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    return {"root": root, "corpus": corpus, "dense": root / "dense", "cache": root / "cache"}


def _eval_argv(model, w, *extra):
    return ["eval", str(model), "--data", str(w["corpus"]), "--split", "val", "--seq-len", "16", "--max-windows", "6",
            "--batch-size", "3", "--cache-dir", str(w["cache"]), "--json", *extra]


def test_analyze_with_the_contribution_activity(work):
    out = work["root"] / "analysis"
    r = run_cli(["analyze", "--model", str(work["dense"]), "--calib", str(work["corpus"]), "--limit", "40",
                 "--activity", "contribution", "--target-sparsity", "0.6", "--out", str(out)])
    assert r.kind == "ok", r.err
    rows = json.loads((out / "analysis.json").read_text())
    assert [r["activity"] for r in rows] == ["contribution"] * 2
    assert all(abs(r["sparsity"] - 0.6) < 0.01 and r["activity_threshold"] > 0 for r in rows)
    assert "|act(g) u| * ||W_down[:, j]||" in r.out


@pytest.mark.parametrize("method,extra", [
    ("mgs", ["--activity", "contribution", "--target-sparsity", "0.5", "--steps", "20"]),
    ("sibs", ["--activity", "contribution", "--target-sparsity", "0.3"]),
    ("cats", ["--target-sparsity", "0.5"]),
])
def test_sparsify_then_eval_reports_the_distance_to_dense(work, method, extra):
    out = work["root"] / f"sparse-{method}"
    r = run_cli(["sparsify", "--model", str(work["dense"]), "--method", method, "--calib", str(work["corpus"]),
                 "--calib-limit", "120", "--out", str(out), *extra])
    assert r.kind == "ok", r.err
    assert (out / "gates.safetensors").is_file() and (out / "modeling_dynsparse.py").is_file()
    r = run_cli(_eval_argv(out, work))
    assert r.kind == "ok", r.err
    got = json.loads(r.out.strip().splitlines()[-1])
    assert got["reference"] == str(out) and got["kl_to_dense"] > 0
    dense = json.loads(run_cli(_eval_argv(work["dense"], work)).out.strip().splitlines()[-1])
    assert got["reference_perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    assert got["perplexity_increase"] == pytest.approx(got["perplexity"] / dense["perplexity"] - 1, abs=1e-6)
    target = 0.3 if method == "sibs" else 0.5
    assert abs(got["ff_active_fraction"] - (1 - target)) < 0.15  # measured on the evaluation text
    # the dense model against itself: no distance
    same = json.loads(run_cli(_eval_argv(work["dense"], work, "--reference", str(work["dense"]))).out.splitlines()[-1])
    assert same["kl_to_dense"] == pytest.approx(0, abs=1e-7) and same["perplexity_increase"] == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("argv,message", [
    (["analyze", "--activity", "contribution"], "needs --target-sparsity"),
    (["analyze", "--activity", "cats", "--target-sparsity", "1"], "must be in [0, 1)"),
    (["analyze", "--target-sparsity", "0.5"], "sign has no threshold"),
    (["sparsify", "--method", "cats"], "cats needs --target-sparsity"),
    (["sparsify", "--method", "cats", "--target-sparsity", "0.5", "--activity", "contribution"], "does not apply"),
    (["sparsify", "--method", "mgs", "--target-sparsity", "1.0", "--activity", "contribution"], "[0, 1)"),
    (["sparsify", "--method", "sibs", "--threshold", "0.1", "--activity", "cats"], "needs activity_sparsity"),
    (["sparsify", "--method", "mgs", "--activity-sparsity", "0.5"], "sign has no threshold"),
    (["sparsify", "--method", "cats", "--target-sparsity", "0.5", "--activity-sparsity", "-0.1"],
     "--activity-sparsity does not apply to --method cats"),
    (["analyze", "--calib", "shakespeare", "--split", "dev"],
     "the built-in shakespeare calibration text has splits train, val, test, not 'dev'"),
])
def test_bad_input_is_one_line(work, argv, message):
    base = ["--model", str(work["dense"]), "--calib", str(work["corpus"])]
    if argv[0] == "sparsify":
        base += ["--out", str(work["root"] / "never")]
    r = run_cli(argv[:1] + base + argv[1:])
    assert r.kind == "clear", (r.kind, r.err)
    assert len(r.error_lines) == 1 and message in r.error_lines[0], r.err
    assert not (work["root"] / "never").exists()


def test_text_models_calibrate_on_the_builtin_plays_by_default(work):
    """Without --calib, a text model calibrates on lines spread over the built-in plays' split."""
    from dynsparse.data.shakespeare import shakespeare_splits
    from dynsparse.gating.calib import calib_batches, default_calib
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work["dense"])
    assert default_calib("text") == "shakespeare"
    batches = calib_batches("text", tok, default_calib("text"), batch_size=4, limit=10, split="test")
    assert len(batches) == 3 and batches[0]["input_ids"].shape[0] == 4
    texts = [tok.decode(row[mask.bool()]) for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])]
    plays = dict(shakespeare_splits()["test"])
    assert sum(t.strip() in plays["macbeth"] for t in texts) and sum(t.strip() in plays["the-tempest"] for t in texts)
    r = run_cli(["analyze", "--model", str(work["dense"]), "--limit", "16"])
    assert r.kind == "ok", r.err


def test_eval_refuses_a_reference_with_another_vocabulary(work, tmp_path):
    cfg = LlamaConfig(vocab_size=77, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    r = run_cli(_eval_argv(work["dense"], work, "--reference", str(tmp_path / "other")))
    assert r.kind == "clear" and "vocabulary" in r.error_lines[0], r.err
