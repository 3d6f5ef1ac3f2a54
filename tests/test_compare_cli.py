"""dynsparse compare end to end on a tiny corpus: table, report.md, figures, reuse and refusal rules."""
import json

from dynsparse.cli import main
from dynsparse.commands.compare import DEMO_FF_DEFAULTS

CORPUS = "".join(f"{i} the king and the queen walked to the {['castle', 'sea', 'hill'][i % 3]}.\n" for i in range(600))


def test_compare_writes_report_and_refuses_other_settings(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(CORPUS)
    argv = ["compare", "--out", str(tmp_path / "cmp"), "--data", str(tmp_path / "c.txt"), "--vocab-size", "300",
            "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--depth", "3", "--trees", "2", "--seq-len", "16",
            "--batch-size", "4", "--max-steps", "4", "--eval-every", "2", "--telemetry-every", "2",
            "--val-windows", "4", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FF active fraction" in out and "target" in out
    cmp = tmp_path / "cmp"
    for name in ("report.md", "loss_curves.png", "routing_training.png", "node_usage.png", "results.json"):
        assert (cmp / name).stat().st_size > 0, name
    res = json.loads((cmp / "results.json").read_text())
    assert res["results"]["tree"]["ff_active_fraction"] == 4 / 15  # measured from routing: 4 of 15 nodes
    assert res["results"]["dense"]["ff_active_fraction"] == 1.0
    assert "| val loss (nats/token) |" in (cmp / "report.md").read_text()
    # Each model gets its own tuned optimisation defaults (DEMO_FF_DEFAULTS); shared ones are equal.
    settings = json.loads((cmp / "compare.json").read_text())
    for key, value in DEMO_FF_DEFAULTS["tree"].items():
        assert settings["tree"][key] == value
    for key, value in DEMO_FF_DEFAULTS["dense"].items():
        assert settings["dense"][key] == value
    shared = set(settings["tree"]) - set(DEMO_FF_DEFAULTS["tree"]) - set(DEMO_FF_DEFAULTS["dense"]) - {"ff"}
    assert all(settings["tree"][k] == settings["dense"][k] for k in shared)
    # Same settings again: both runs are reused, not retrained.
    mtime = (cmp / "tree" / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(argv + ["--json"]) == 0
    assert (cmp / "tree" / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Different settings: refused without --overwrite, nothing touched.
    assert main(argv[:-1] + ["--depth", "2", "--no-progress"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert (cmp / "tree" / "final" / "model.safetensors").stat().st_mtime_ns == mtime
