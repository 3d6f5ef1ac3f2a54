"""Nothing a user has is lost (issue 15): outputs never replace inputs or other folders, a run is held by
one process at a time, a kill at any moment leaves a run that resumes, and a failed start leaves nothing."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import TINY, make_world, run_cli, snapshot, train_argv
from dynsparse.outputs import LOCK_NAME, live_holder
from dynsparse.train import list_checkpoints


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def run(w, tmp_path):
    """A private copy of the finished tiny run (4 steps, checkpoints at 2 and 4)."""
    shutil.copytree(w["run"], tmp_path / "run")
    return tmp_path / "run"


def _hold_lock(directory):
    code = ("import sys, time; from dynsparse.outputs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _resume(w, run, steps=4, *extra):
    return ["train", *TINY, "--max-steps", str(steps), "--data", str(w["corpus"]), "--cache-dir", str(w["cache"]),
            "--out", str(run), "--resume", *extra]


def test_inspect_refreshes_its_report_and_keeps_everything_else(w, run, tmp_path):
    before = snapshot(run)
    assert run_cli(["inspect", str(run)]).kind == "ok"
    assert run_cli(["inspect", str(run)]).kind == "ok"  # its own report: refreshed without --overwrite
    after = snapshot(run, skip=(run / "inspect",))
    assert after == before and (run / "inspect" / "inspect.md").is_file()
    out = tmp_path / "report"
    assert run_cli(["inspect", str(run), "--out", str(out)]).kind == "ok"
    assert (out / "inspect.md").is_file()
    for bad in (run, tmp_path, w["mine"], w["file"]):  # the run, a folder holding it, other files, a file
        o = run_cli(["inspect", str(run), "--out", str(bad), "--overwrite"])
        assert o.kind == "clear", o.err
    assert snapshot(run, skip=(run / "inspect",)) == before
    assert (w["mine"] / "thesis.tex").read_text() == "years of work" and w["file"].read_text() == "a plain file"


def test_sparsify_never_replaces_a_run_or_earlier_gates_without_overwrite(w, run, tmp_path):
    argv = ["sparsify", "--model", str(w["detr"]), "--method", "sibs", "--target-sparsity", "0.5",
            "--calib", str(w["coco"]), "--calib-limit", "4"]
    before = snapshot(run)
    assert run_cli([*argv, "--out", str(run)]).kind == "clear"
    assert snapshot(run) == before
    out = tmp_path / "gates"
    assert run_cli([*argv, "--out", str(out)]).kind == "ok"
    first = (out / "gates.safetensors").read_bytes()
    o = run_cli([*argv, "--target-sparsity", "0.25", "--out", str(out)])
    assert o.kind == "clear" and "--overwrite" in o.error_lines[0]
    assert (out / "gates.safetensors").read_bytes() == first
    assert run_cli([*argv, "--target-sparsity", "0.25", "--out", str(out), "--overwrite"]).kind == "ok"
    assert (out / "gates.safetensors").read_bytes() != first


def test_prune_never_deletes_its_input(w, run, tmp_path):
    before = snapshot(run)
    for out in (run, run.parent):
        o = run_cli(["prune", str(run), "--out", str(out), "--overwrite", "--calib-windows", "2", "--val-windows", "2"])
        assert o.kind == "clear" and "input" in o.error_lines[0]
    assert snapshot(run) == before
    o = run_cli(["prune", str(run), "--out", str(tmp_path / "pruned"), "--calib-windows", "2", "--val-windows", "2"])
    assert o.kind == "ok", o.err
    assert (tmp_path / "pruned" / "prune_report.json").is_file() and snapshot(run) == before


def _metrics(run):
    return json.loads((run / "final" / "metrics.json").read_text())


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_kill_during_the_final_save_then_resume_finishes_the_run(w, run, old_checkpoint):
    """The state a SIGKILL inside save_final leaves: every checkpoint written, final/ absent, a half-written
    temporary beside it. --resume writes the final model with the run's real numbers."""
    want = _metrics(run)
    shutil.rmtree(run / "final")
    (run / ".final.k1ll3d00").mkdir()
    (run / ".final.k1ll3d00" / "model.safetensors").write_bytes(b"half")
    if old_checkpoint:  # a checkpoint from before the state kept the losses: evaluated / read from the log again
        ck = list_checkpoints(run)[-1][1]
        state = json.loads((ck / "state.json").read_text())
        (ck / "state.json").write_text(json.dumps({"step": state["step"], "tokens": state["tokens"]}))
        manifest = json.loads((ck / "manifest.json").read_text())
        manifest["state.json"] = hashlib.sha256((ck / "state.json").read_bytes()).hexdigest()
        (ck / "manifest.json").write_text(json.dumps(manifest))
    o = run_cli(_resume(w, run))
    assert o.kind == "ok", o.err
    got = _metrics(run)
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-6)
    assert got["val_ppl"] == pytest.approx(want["val_ppl"], rel=1e-6)
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5 if old_checkpoint else 0)
    assert got["steps"] == want["steps"] and got["tokens"] == want["tokens"]
    assert not (run / ".final.k1ll3d00").exists() and "removed the temporary" in o.err
    assert "val loss" in o.out


def test_resume_past_the_last_checkpoint_is_refused(w, run):
    shutil.rmtree(run / "final")
    o = run_cli(_resume(w, run, 2))
    assert o.kind == "clear" and "--max-steps 4 or more" in o.error_lines[0]


def test_train_holds_the_lock_while_it_runs_and_releases_it(w, tmp_path):
    from dynsparse.train import TrainConfig, train

    seen = []
    cfg = TrainConfig.build("tiny", ff="tree", d_model=16, n_layer=1, n_head=2, depth=2, vocab_size=260, seq_len=8,
                            batch_size=2, max_steps=2, eval_every=2, eval_batches=1, ckpt_every=2, telemetry_every=2,
                            data=str(w["corpus"]), cache_dir=str(w["cache"]))
    train(cfg, tmp_path / "r", progress=False, tensorboard=False,
          on_step=lambda step, loss: seen.append(live_holder(tmp_path / "r")))
    assert seen == [os.getpid()] * 2
    assert not (tmp_path / "r" / LOCK_NAME).exists() and live_holder(tmp_path / "r") is None


def test_a_live_run_is_never_joined_nor_replaced(w, run):
    proc = _hold_lock(run)
    try:
        before = snapshot(run, skip=(run / LOCK_NAME,))
        for argv in (_resume(w, run, 6), train_argv(w["corpus"], run, w["cache"]) + ["--overwrite"],
                     train_argv(w["corpus"], run, w["cache"])):
            o = run_cli(argv)
            assert o.kind == "clear" and f"pid {proc.pid}" in o.error_lines[0], o.err
        o = run_cli(["compare", "--out", str(run.parent), "--overwrite", "--data", str(w["corpus"])])
        assert o.kind == "clear" and "in use" in o.error_lines[0]
        assert snapshot(run, skip=(run / LOCK_NAME,)) == before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died: its lock is stale, reported, and taken over by the next start
    o = run_cli(_resume(w, run, 6))
    assert o.kind == "ok", o.err
    assert f"stale lock from pid {proc.pid}" in o.err
    assert [s for s, _ in list_checkpoints(run)] == [4, 6] and not (run / LOCK_NAME).exists()


def test_a_failed_start_leaves_nothing_behind(w, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "r"
    o = run_cli(train_argv(empty, out, tmp_path / "cache"))
    assert o.kind == "clear"
    assert not out.exists()  # created for the start, removed with it
    out.mkdir()  # a folder the user made beforehand stays, empty
    o = run_cli(train_argv(empty, out, tmp_path / "cache"))
    assert o.kind == "clear" and list(out.iterdir()) == []
    o = run_cli(train_argv(w["corpus"], out, tmp_path / "cache", steps=2))  # corrected: no --overwrite needed
    assert o.kind == "ok", o.err
    assert (out / "final" / "metrics.json").is_file()


def test_temporaries_of_a_killed_run_are_cleaned_on_the_next_start(w, run):
    (run / "checkpoints" / ".step_6.abcd1234").mkdir()
    (run / "checkpoints" / ".step_6.abcd1234" / "model.safetensors").write_bytes(b"half")
    (run / "config.tmp").write_text("{")
    o = run_cli(_resume(w, run, 6))
    assert o.kind == "ok", o.err
    assert not (run / "checkpoints" / ".step_6.abcd1234").exists() and not (run / "config.tmp").exists()
    assert o.err.count("removed the temporary") == 2
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]


def test_token_cache_temporaries_of_killed_builds_go_but_live_builds_stay(tmp_path):
    import fcntl

    from dynsparse.data import prepare_tokens, text_source
    from dynsparse.data.tokens import BUILDING

    cache = tmp_path / "cache"
    old = time.time() - 3600
    killed, free, young, live = (cache / f".tokens-{n}" for n in ("killed00", "free0000", "young000", "live0000"))
    for d in (killed, free, young, live):
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(b"half")
    (free / BUILDING).write_bytes(b"")  # its builder died: the lock is free
    (live / BUILDING).write_bytes(b"")
    for d in (killed, free, live):
        os.utime(d, (old, old))
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of some text here\n" for i in range(300)))
    with (live / BUILDING).open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build still running (in another process, as far as flock is concerned)
        prepare_tokens(text_source(str(corpus)), 260, cache_dir=cache)
    assert not killed.exists() and not free.exists()
    assert young.exists() and live.exists()  # a build between mkdtemp and its lock; a live build


def test_checkpoint_with_rewritten_manifest_falls_back_to_the_previous_one(w, run):
    newest = list_checkpoints(run)[-1][1]
    (newest / "optimizer.pt").write_bytes(b"not a checkpoint")
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["optimizer.pt"] = hashlib.sha256(b"not a checkpoint").hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(run / "final")
    o = run_cli(_resume(w, run, 4))
    assert o.kind == "ok", o.err
    assert "step_4: optimizer.pt is unreadable" in o.err and "resuming from" in o.err
    aside = run / "checkpoints" / "corrupt-step_4"
    assert (aside / "optimizer.pt").read_bytes() == b"not a checkpoint"  # kept aside, never deleted
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]  # step 4 trained again from step 2
    assert _metrics(run)["steps"] == 4


@pytest.mark.slow
def test_two_real_processes_on_one_run(w, tmp_path):
    """The probe's scenario with real processes: a second --resume and an --overwrite while a run trains
    are refused; after the first is killed, its stale lock is reported and the run finishes from its checkpoint."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "dynsparse.cli", *train_argv(w["corpus"], run, w["cache"], steps=100_000)]
    argv[argv.index("--ckpt-every") + 1] = "20"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list_checkpoints(run):
            time.sleep(0.1)
        assert list_checkpoints(run), "the first run wrote no checkpoint"
        for extra in (["--resume"], ["--overwrite"]):
            second = subprocess.run(argv + extra, env=env, capture_output=True, text=True, timeout=300)
            assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
            assert first.poll() is None  # the first one was alive all along
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == sorted(set(steps))  # one writer: no repeated or lost steps
    last = list_checkpoints(run)[-1][0]
    argv[argv.index("--max-steps") + 1] = str(last)
    done = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"stale lock from pid {first.pid}" in done.stderr, done.stderr
    assert json.loads((run / "final" / "metrics.json").read_text())["steps"] == last
