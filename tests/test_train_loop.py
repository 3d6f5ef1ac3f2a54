"""Training loop: exact resume after a crash, checkpoints (atomic, verified, last 2 kept), run-dir rules,
telemetry snapshots, final HF directory, bad input through the CLI."""
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import dynsparse.lm  # noqa: F401  (registers the auto classes)
from dynsparse.cli import main
from dynsparse.train import RunDirError, TrainConfig, list_checkpoints, lr_at, train

from dynsparse.train.telemetry import read_jsonl

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(600))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "text.txt").write_text(CORPUS)
    return str(d / "text.txt")


def cfg(corpus, tmp_path, **kw):
    base = dict(ff="tree", d_model=32, n_layer=2, n_head=2, depth=3, trees=2, vocab_size=300, seq_len=16,
                batch_size=4, max_steps=6, warmup_steps=2, eval_every=3, eval_batches=1, ckpt_every=2,
                log_every=1, telemetry_every=2, data=corpus, cache_dir=str(tmp_path.parent / "cache"),
                dropout=0.1)
    return TrainConfig.build("tiny", **{**base, **kw})


def losses(run):
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


class Crash(Exception):
    pass


def test_resume_after_crash_gives_identical_losses(corpus, tmp_path):
    c = cfg(corpus, tmp_path)
    full = train(c, tmp_path / "full", progress=False)
    assert full["steps"] == 6 and full["tree_path_entropy"] > 0

    def crash(step, loss):
        if step == 5:  # after the step-4 checkpoint, before the step-6 one
            raise Crash

    with pytest.raises(Crash):
        train(c, tmp_path / "cut", progress=False, on_step=crash)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [2, 4]
    assert not (tmp_path / "cut" / "final").exists()
    resumed = train(c, tmp_path / "cut", resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    a = read_jsonl(tmp_path / "full" / "telemetry.jsonl")
    b = read_jsonl(tmp_path / "cut" / "telemetry.jsonl")
    assert [r["layers"] for r in a] == [r["layers"] for r in b]  # routing counts resume exactly too


def test_run_dir_outputs(corpus, tmp_path):
    metrics = train(cfg(corpus, tmp_path, max_steps=4), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["depth"] == 3
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]  # keep the last 2
    snaps = read_jsonl(run / "telemetry.jsonl")
    assert [s["step"] for s in snaps] == [2, 4]
    layer = snaps[0]["layers"]["transformer.h.0.mlp"]
    assert layer["tokens"] == 2 * 4 * 16 and sum(map(sum, layer["leaf_visits"])) == 2 * 4 * 16 * 2
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = tok("the king", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert metrics["ff_active_fraction"] == pytest.approx(4 / 15)


def test_corrupt_checkpoint_is_reported_and_kept(corpus, tmp_path, capsys):
    c = cfg(corpus, tmp_path, max_steps=4)
    train(c, tmp_path / "run", progress=False)
    last = list_checkpoints(tmp_path / "run")[-1][1]
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    # The newest is named and set aside (never deleted); the run resumes from the newest intact one.
    train(cfg(corpus, tmp_path, max_steps=6), tmp_path / "run", resume=True, progress=False)
    assert "step_4: model.safetensors is corrupt or truncated" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "corrupt-step_4" / "model.safetensors").stat().st_size == 100
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4, 6]


def test_run_dir_rules(corpus, tmp_path):
    c = cfg(corpus, tmp_path, max_steps=2)
    train(c, tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="holds another run"):
        train(c, tmp_path / "run", progress=False)
    with pytest.raises(RunDirError, match="differs in depth"):
        train(cfg(corpus, tmp_path, max_steps=2, depth=4), tmp_path / "run", resume=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="does not look like a run"):
        train(c, tmp_path / "other", overwrite=True, progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_lr_schedule():
    c = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 60) == pytest.approx(0.55) and lr_at(c, 110) == pytest.approx(0.1)


@pytest.mark.parametrize("argv,match", [
    (["--preset", "huge"], "invalid choice"),
    (["--telemetry-every", "0"], "telemetry-every"),
    (["--data", "/nonexistent/corpus.txt"], "data not found"),
    (["--batch-size", "5", "--grad-accum", "2"], "divisible by grad_accum"),
])
def test_cli_bad_input(argv, match, tmp_path, capsys):
    try:
        code = main(["train", "--out", str(tmp_path / "r"), "--max-steps", "1", *argv])
    except SystemExit as e:  # argparse rejects unknown choices itself
        code = e.code
    assert code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r" / "final").exists()


def test_cli_corpus_shorter_than_sequence(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("".join(f"tiny line {i}\n" for i in range(60)))
    code = main(["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "c.txt"), "--vocab-size", "260",
                 "--seq-len", "4096", "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1"])
    assert code == 2 and "fewer than one sequence" in capsys.readouterr().err


def test_cli_json(corpus, tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), "--data", corpus, "--vocab-size", "300", "--d-model", "32",
                 "--n-layer", "1", "--n-head", "2", "--seq-len", "16", "--batch-size", "2", "--max-steps", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["steps"] == 2 and metrics["ff_active_fraction"] == 1.0


def test_grad_accumulation_matches_full_batch(corpus, tmp_path):
    a = train(cfg(corpus, tmp_path, max_steps=3, dropout=0.0), tmp_path / "a", progress=False)
    b = train(cfg(corpus, tmp_path, max_steps=3, dropout=0.0, grad_accum=2), tmp_path / "b", progress=False)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-4)
    assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)


def test_bf16_autocast_trains(corpus, tmp_path):
    metrics = train(cfg(corpus, tmp_path, max_steps=2, dtype="bf16"), tmp_path / "bf16", progress=False)
    assert all(map(lambda v: v == v, losses(tmp_path / "bf16"))) and metrics["val_loss"] < 10
