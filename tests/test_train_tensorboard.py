"""TensorBoard logs of a training run: the scalars of metrics.jsonl/telemetry.jsonl, no doubled steps
after a resume, --no-tensorboard, and a one-line notice when the package is missing."""
import pytest

from dynsparse.train import TrainConfig, tensorboard_log, train
from dynsparse.train.telemetry import read_jsonl

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(600))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "text.txt").write_text(CORPUS)
    return str(d / "text.txt")


def cfg(corpus, tmp_path, **kw):
    base = dict(ff="tree", d_model=32, n_layer=2, n_head=2, depth=2, trees=2, vocab_size=300, seq_len=16,
                batch_size=4, max_steps=6, warmup_steps=2, eval_every=3, eval_batches=1, ckpt_every=2,
                log_every=1, telemetry_every=2, data=corpus, cache_dir=str(tmp_path.parent / "cache"))
    return TrainConfig.build("tiny", **{**base, **kw})


def scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def purge_steps(run):
    """Steps at which an events file tells readers to drop what was logged from there on."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    return [e.step for f in sorted((run / "tensorboard").glob("events.*")) for e in EventFileLoader(str(f)).Load()
            if e.HasField("session_log") and e.session_log.status == SessionLog.START]


class Crash(Exception):
    pass


def test_scalars_match_the_jsonl_logs_and_resume_does_not_double_steps(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    run, c = tmp_path / "run", cfg(corpus, tmp_path)

    def crash_at_5(step, loss):
        if step == 5:  # after step 5 is logged; the last checkpoint is step 4
            raise Crash

    with pytest.raises(Crash):
        train(c, run, progress=False, on_step=crash_at_5)
    before = scalars(run)
    assert [s for s, _ in before["train/loss"]] == [1, 2, 3, 4]
    train(c, run, resume=True, progress=False)

    # The resumed writer marks step 5 as purged, so every reader (not only EventAccumulator, which also
    # drops out-of-order steps by itself) shows the repeated steps once.
    assert purge_steps(run) == [5]
    got = scalars(run)
    metrics, snaps = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "telemetry.jsonl")
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]  # step 5 once, from the resumed run
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["loss"] for r in metrics])
    assert [v for _, v in got["train/lr"]] == pytest.approx([r["lr"] for r in metrics])
    assert [s for s, _ in got["train/tokens_per_s"]] == [1, 2, 3, 4, 5, 6]
    assert got["val/loss"] == [(r["step"], pytest.approx(r["val_loss"])) for r in metrics if "val_loss" in r]
    assert [s for s, _ in got["val/loss"]] == [3, 6]
    assert [v for _, v in got["ff/active_fraction"]] == pytest.approx([3 / 7] * 6)  # depth 2: 3 of 7 nodes
    layer = next(iter(snaps[0]["layers"]))
    assert [s for s, _ in got["tree/mean/path_entropy"]] == [r["step"] for r in snaps] == [2, 4, 6]
    assert [v for _, v in got[f"tree/{layer}/dead_fraction"]] == pytest.approx(
        [r["layers"][layer]["dead_fraction"] for r in snaps])


def test_no_tensorboard_and_missing_package(corpus, tmp_path, monkeypatch, capsys):
    train(cfg(corpus, tmp_path, max_steps=2), tmp_path / "off", progress=False, tensorboard=False)
    assert not (tmp_path / "off" / "tensorboard").exists()
    monkeypatch.setattr(tensorboard_log, "summary_writer_class", lambda: None)
    train(cfg(corpus, tmp_path, max_steps=2), tmp_path / "absent", progress=False)
    assert not (tmp_path / "absent" / "tensorboard").exists()
    notice = [l for l in capsys.readouterr().err.splitlines() if "tensorboard" in l]
    assert len(notice) == 1 and "not installed" in notice[0]
