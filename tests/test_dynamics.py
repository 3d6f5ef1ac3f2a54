"""Issue 3: routing reports over training, static conversion of a trained tree LM, the auto-pruning study."""
import json
import random

import pytest
import torch

from dynsparse.cli import main


def _corpus(path):
    """A small synthetic corpus (a few hundred KB) so BPE training and tokenizing take seconds."""
    rng = random.Random(0)
    words = "the king queen lord speak night day love war crown sword heart fool death grace honour".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(12000)]
    path.write_text("\n".join(lines))
    return path


def _train(tmp, name, ff="tree", **over):
    from dynsparse.train.config import TrainConfig
    from dynsparse.train.loop import train

    cfg = TrainConfig(preset="tiny", ff=ff, depth=3, trees=2, d_model=32, n_layer=2, n_head=2, seq_len=32,
                      batch_size=8, max_steps=12, warmup_steps=2, telemetry_every=4, eval_every=6, ckpt_every=6,
                      eval_batches=2, vocab_size=300, data=str(tmp / "corpus.txt"), cache_dir=str(tmp / "cache"),
                      **over)
    train(cfg, tmp / name, progress=False)
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dyn")
    _corpus(tmp / "corpus.txt")
    return {"tree": _train(tmp, "tree"), "dense": _train(tmp, "dense", ff="dense"), "tmp": tmp}


def test_inspect_writes_report_and_table(runs, capsys):
    assert main(["inspect", str(runs["tree"])]) == 0
    out = capsys.readouterr().out
    assert "h.0" in out and "h.1" in out and "report:" in out
    folder = runs["tree"] / "inspect"
    md = (folder / "inspect.md").read_text()
    assert "| layer | step | dead |" in md
    for png in ("trajectories.png", "depth_heatmap_0.png", "tree_usage_0.png", "tree_usage_1.png"):
        assert (folder / png).stat().st_size > 1000
    records = [json.loads(line) for line in (runs["tree"] / "telemetry.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    # every snapshot counts exactly the tokens routed since the previous one: 4 steps x 8 x 32 per layer
    layer = records[1]["layers"]["transformer.h.0.mlp"]
    assert sum(map(sum, layer["leaf_visits"])) == 4 * 8 * 32 * 2  # two trees


def test_inspect_tolerates_a_live_run(runs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    text = (runs["tree"] / "telemetry.jsonl").read_text()
    (live / "telemetry.jsonl").write_text(text + '{"step": 16, "lay')  # a line mid-write
    assert main(["inspect", str(live), "--layers", "1"]) == 0
    assert (live / "inspect" / "inspect.md").exists()


def test_inspect_bad_input(runs, tmp_path, capsys):
    assert main(["inspect", str(runs["dense"])]) == 2
    assert "telemetry" in capsys.readouterr().err
    assert not (runs["dense"] / "inspect").exists()
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert main(["inspect", str(runs["tree"]), "--layers", "0"]) == 2


def test_prune_saves_a_smaller_model_that_is_exact_on_calibration(runs, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(runs["tree"]), "--out", str(out), "--calib-windows", "8", "--val-windows", "4",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["params_after"] < r["params_before"] and r["nodes_after"] < r["nodes_before"]
    assert r["calib_loss_after"] == pytest.approx(r["calib_loss_before"], abs=1e-5)
    assert r["val_ppl_before"] > 1 and r["calib_ppl_after"] == pytest.approx(r["calib_ppl_before"], rel=1e-4)
    from transformers import AutoModelForCausalLM

    import dynsparse.dynamics.pruned_lm  # noqa: F401  (registers the auto classes)
    from dynsparse.dynamics.prune_run import _loss
    from dynsparse.data import eval_windows, load_tokens

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "PrunedDynSparseLMForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == r["params_after"]
    cache = next((runs["tmp"] / "cache").glob("tokens-*"))
    calib = eval_windows(load_tokens(cache).splits["train"], 32, 8)
    assert _loss(model, calib) == pytest.approx(r["calib_loss_before"], abs=1e-5)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    from dynsparse.eval import evaluate_lm

    measured = evaluate_lm(model, load_tokens(cache).splits["val"], 32, max_windows=4)
    # every kept path still has depth + 1 = 4 nodes per tree (2 trees, d 32): the measured cost is unchanged
    assert measured.ff_flops_per_token == 2 * 2 * 4 * (32 + 32)
    assert 0 < measured.ff_active_fraction <= 1


def test_prune_bad_input(runs, tmp_path):
    out = tmp_path / "x"
    assert main(["prune", str(runs["dense"]), "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["prune", str(tmp_path), "--out", str(out)]) == 2
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", str(runs["tree"]), "--out", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine"


def test_zero_snapshot_interval_is_refused():
    from dynsparse.train.config import TrainConfig

    with pytest.raises(ValueError, match="telemetry_every"):
        TrainConfig(telemetry_every=0)
