"""A training process killed with SIGKILL resumes from its last checkpoint with identical losses."""
import os
import signal
import subprocess
import sys
import time

import pytest

from dynsparse.train import list_checkpoints
from dynsparse.train.telemetry import read_jsonl

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(600))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    (tmp_path / "c.txt").write_text(CORPUS)
    args = ["train", "--ff", "tree", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--depth", "3",
            "--vocab-size", "300", "--seq-len", "16", "--batch-size", "4", "--max-steps", "200", "--ckpt-every", "3",
            "--log-every", "1", "--eval-every", "1000", "--data", str(tmp_path / "c.txt"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every process: same float sums
    cli = [sys.executable, "-m", "dynsparse.cli", *args]
    subprocess.run([*cli, "--out", str(tmp_path / "full")], env=env, check=True)
    proc = subprocess.Popen([*cli, "--out", str(tmp_path / "cut")], env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 6 for s, _ in list_checkpoints(tmp_path / "cut")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = [s for s, _ in list_checkpoints(tmp_path / "cut")]
    assert steps and steps[-1] < 200, "the run finished before it could be killed"
    subprocess.run([*cli, "--out", str(tmp_path / "cut"), "--resume"], env=env, check=True)
    full = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    cut = [r["loss"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")]
    assert cut == full
