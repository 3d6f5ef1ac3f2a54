"""The shared output rules (dynsparse.outputs), the run lock and recovery of interrupted atomic writes."""
import json
import os
import signal
import subprocess
import sys


import pytest

from dynsparse.atomic import atomic_dir, recover
from dynsparse.outputs import LOCK_NAME, OutputError, RunLock, check_output_file, kind_of, live_holder, prepare_output


def _hold_lock(directory):
    """A separate process that takes the lock and sleeps; returns it once the lock is held."""
    code = ("import sys, time; from dynsparse.outputs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_kinds_are_recognised(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"max_steps": 2, "preset": "tiny", "ff": "tree"}))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "gates").mkdir()
    (tmp_path / "gates" / "config.json").write_text(json.dumps({"model_type": "detr"}))
    (tmp_path / "gates" / "gates.safetensors").write_bytes(b"")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    assert [kind_of(tmp_path / n) for n in ("run", "model", "gates", "other", "missing")] == \
        ["run", "model", "sparsify", None, None]
    study = tmp_path / "study"
    (study / "node-gelu").mkdir(parents=True)
    (study / "node-gelu" / "metrics.jsonl").write_text("")
    assert kind_of(study) == "study"  # stopped before its report: only run folders


def test_prepare_output_rules(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="did not write"):
        prepare_output(mine, "inspect")
    with pytest.raises(OutputError, match="even with --overwrite"):
        prepare_output(mine, "inspect", overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        prepare_output(mine / "a.txt", "inspect")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        prepare_output(mine / "a.txt" / "sub", "inspect")
    with pytest.raises(OutputError, match="is the input"):
        prepare_output(mine, "prune", overwrite=True, inputs=[mine])
    with pytest.raises(OutputError, match="contains the input"):
        prepare_output(tmp_path, "prune", overwrite=True, inputs=[mine / "a.txt"])
    assert prepare_output(mine / "sub", "inspect", inputs=[mine]) == mine / "sub"  # inside an input is fine
    assert prepare_output(tmp_path / "new", "sparsify", inputs=["shakespeare", None]) == tmp_path / "new"
    report = tmp_path / "report"
    report.mkdir()
    (report / "inspect.md").write_text("old")
    assert prepare_output(report, "inspect", reuse_own=True) == report  # a report is refreshed
    with pytest.raises(OutputError, match="pass --overwrite"):
        prepare_output(report, "sparsify")
    assert prepare_output(report, "sparsify", overwrite=True) == report
    assert (report / "inspect.md").read_text() == "old"  # prepare_output never writes


def test_output_file_rules(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="does not exist"):
        check_output_file(tmp_path / "nowhere" / "x.json")
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path / "model")
    with pytest.raises(OutputError, match="would replace"):
        check_output_file(tmp_path / "model" / "config.json", inputs=[tmp_path / "model"])
    assert check_output_file(tmp_path / "x.json", inputs=[tmp_path / "model"]) == tmp_path / "x.json"


def test_lock_is_exclusive_and_released(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    assert run.is_dir() and live_holder(run) == os.getpid()
    with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
        RunLock(run).acquire()
    with pytest.raises(OutputError, match="in use by a running dynsparse process"):
        prepare_output(tmp_path, "compare", overwrite=True)  # a live run below a folder to replace
    lock.release()
    assert not (run / LOCK_NAME).exists() and not run.exists()  # created for a start that did nothing
    assert live_holder(run) is None


def test_lock_held_by_another_process_then_stale_after_it_dies(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold_lock(run)
    try:
        assert live_holder(run) == proc.pid
        with pytest.raises(OutputError, match=f"pid {proc.pid}"):
            RunLock(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (run / LOCK_NAME).exists() and live_holder(run) is None  # left behind, but nobody holds it
    lock = RunLock(run).acquire()
    assert lock.stale["pid"] == proc.pid and f"stale lock from pid {proc.pid}" in lock.stale_note()
    lock.release()
    assert run.is_dir()  # it existed before: kept


def test_recover_restores_a_target_moved_aside_and_removes_temporaries(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "w").write_text("old model")
    # a kill between the two renames of atomic_dir: the old one set aside, the new one not yet in place
    (tmp_path / ".final.old.abcd1234").mkdir()
    os.replace(tmp_path / "final", tmp_path / ".final.old.abcd1234" / "final")
    (tmp_path / ".final.zz99xx88").mkdir()  # the new one, unfinished
    (tmp_path / ".step_6.q1w2e3r4").mkdir()
    (tmp_path / ".notes.abcdefgh").write_text("someone else's")
    done = recover(tmp_path, lambda name: name in ("final", "step_6"))
    assert (tmp_path / "final" / "w").read_text() == "old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.abcdefgh", "final"]
    assert any("restored" in line for line in done)


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    assert recover(tmp_path, lambda name: True) == []
