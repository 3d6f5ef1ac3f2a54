"""analyze / sparsify / detr-eval end to end on a tiny DETR and a tiny synthetic set, plus bad input."""
import json

import pytest
import torch
from transformers import DetrForObjectDetection

from dynsparse.cli import main
from dynsparse.detection.model import small_detr_config, small_detr_processor
from dynsparse.detection.synthetic import CLASSES, make_synthetic_coco


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmd")
    coco = make_synthetic_coco(tmp / "coco", n_train=16, n_val=4, seed=1)
    torch.manual_seed(0)
    cfg = small_detr_config(dict(enumerate(CLASSES)), d_model=32, layers=1, d_ff=64, num_queries=5)
    model_dir = tmp / "detr"
    DetrForObjectDetection(cfg).save_pretrained(model_dir)
    small_detr_processor().save_pretrained(model_dir)
    return tmp, coco, model_dir


def test_analyze_writes_table_json_and_plots(setup, capsys):
    tmp, coco, model_dir = setup
    assert main(["analyze", "--model", str(model_dir), "--calib", str(coco), "--out", str(tmp / "an")]) == 0
    rows = json.loads((tmp / "an" / "analysis.json").read_text())
    assert [r["layer"] for r in rows] == ["model.encoder.layers.0.mlp", "model.decoder.layers.0.mlp"]
    assert rows[0]["tokens"] == 4 * 64 and rows[1]["tokens"] == 4 * 5
    assert (tmp / "an" / "sparsity.png").is_file() and "MLP activation sparsity" in capsys.readouterr().out


@pytest.mark.parametrize("method,extra", [("sibs", ["--target-sparsity", "0.5"]),
                                          ("mgs", ["--target-recall", "0.9", "--rank", "4", "--steps", "30"])])
def test_sparsify_then_detr_eval(setup, method, extra, capsys):
    tmp, coco, model_dir = setup
    out = tmp / f"sp_{method}"
    rc = main(["sparsify", "--model", str(model_dir), "--method", method, "--calib", str(coco), "--out", str(out)] + extra)
    assert rc == 0
    assert (out / "gates.safetensors").is_file() and (out / "config.json").is_file()
    report = json.loads((out / "sparsify_report.json").read_text())
    assert report["method"] == method and len(report["layers"]) == 2
    js = tmp / f"eval_{method}.json"
    assert main(["detr-eval", "--model", str(model_dir), "--coco", str(coco), "--sparsify", str(out),
                 "--batch-size", "2", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in text
    assert set(json.loads(js.read_text())["stats"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_bad_inputs_exit_2_without_partial_output(setup, tmp_path, capsys):
    tmp, coco, model_dir = setup
    out = tmp_path / "out"
    assert main(["sparsify", "--model", str(tmp_path), "--method", "sibs", "--threshold", "0.1",
                 "--calib", str(coco), "--out", str(out)]) == 2
    assert "config.json" in capsys.readouterr().err
    empty = make_synthetic_coco(tmp_path / "empty", n_train=0, n_val=1)
    assert main(["sparsify", "--model", str(model_dir), "--method", "mgs", "--calib", str(empty), "--out", str(out)]) == 2
    assert "no COCO annotation file" in capsys.readouterr().err
    assert main(["sparsify", "--model", str(model_dir), "--method", "mgs", "--calib", str(coco),
                 "--calib-limit", "1", "--out", str(out)]) == 2
    assert "need >= 64" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert main(["sparsify", "--model", str(model_dir), "--method", "sibs", "--calib", str(coco), "--out", str(out)]) == 2
    assert "--threshold or --target-sparsity" in capsys.readouterr().err
    # gates for another model
    other = tmp_path / "other"
    cfg = small_detr_config(dict(enumerate(CLASSES)), d_model=32, layers=1, d_ff=128, num_queries=5)
    DetrForObjectDetection(cfg).save_pretrained(other)
    small_detr_processor().save_pretrained(other)
    gates = tmp / "sp_sibs"
    if gates.exists():
        assert main(["detr-eval", "--model", str(other), "--coco", str(coco), "--sparsify", str(gates)]) == 2
        assert "does not match" in capsys.readouterr().err
    assert main(["detr-eval", "--model", str(model_dir), "--coco", str(tmp_path / "nowhere")]) == 2
    assert "no COCO annotation file" in capsys.readouterr().err
