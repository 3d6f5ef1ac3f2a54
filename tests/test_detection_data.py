"""Synthetic COCO set, COCO loading and pycocotools evaluation."""
import json

import pytest
import torch

from dynsparse.detection.coco import CocoDetection, make_collate
from dynsparse.detection.evaluate import STAT_NAMES, coco_evaluate, predict_coco
from dynsparse.detection.model import small_detr_config, small_detr_processor
from dynsparse.detection.synthetic import CLASSES, make_synthetic_coco


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("d") / "synth", n_train=6, n_val=5, seed=3)


def test_synthetic_set_is_valid_coco_and_deterministic(synth, tmp_path):
    d = json.loads((synth / "annotations" / "instances_val.json").read_text())
    assert [c["name"] for c in d["categories"]] == list(CLASSES)
    per_image = {im["id"]: 0 for im in d["images"]}
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
        per_image[a["image_id"]] += 1
    assert all(1 <= n <= 6 for n in per_image.values())
    again = make_synthetic_coco(tmp_path / "again", n_train=6, n_val=5, seed=3)
    assert (again / "annotations" / "instances_val.json").read_text() == json.dumps(d)
    assert (again / "val" / "000002.png").read_bytes() == (synth / "val" / "000002.png").read_bytes()
    with pytest.raises(FileExistsError):
        make_synthetic_coco(again, 1, 1)


def test_ground_truth_as_predictions_scores_ap_one(synth, capsys):
    ds = CocoDetection(synth, "val")
    d = json.loads(ds.ann_file.read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in d["annotations"]]
    stats = coco_evaluate(ds.ann_file, results)
    assert set(stats) == set(STAT_NAMES) and stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    with pytest.raises(ValueError, match="no detections"):
        coco_evaluate(ds.ann_file, [])


def test_predict_keeps_every_query_in_original_coordinates(synth):
    from transformers import DetrForObjectDetection

    torch.manual_seed(0)
    ds = CocoDetection(synth, "val")
    model = DetrForObjectDetection(small_detr_config(ds.id2label, d_model=32, layers=1, d_ff=64, num_queries=5))
    res = predict_coco(model, small_detr_processor(), ds, batch_size=2)
    assert len(res) == 5 * len(ds)  # score threshold 0: all queries of all images
    assert {r["category_id"] for r in res} <= {c["id"] for c in ds.categories}
    assert all(-1 <= r["bbox"][0] <= 129 and r["bbox"][2] >= 0 for r in res)


def test_collate_gives_contiguous_labels_and_sizes(synth):
    ds = CocoDetection(synth, "train")
    b = make_collate(small_detr_processor())([ds[0], ds[1]])
    assert b["pixel_values"].shape == (2, 3, 128, 128) and b["orig_sizes"].tolist() == [[128, 128]] * 2
    assert all(0 <= int(c) < len(CLASSES) for lab in b["labels"] for c in lab["class_labels"])


def test_bad_coco_inputs_are_named(synth, tmp_path):
    root = tmp_path / "bad"
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    ann = root / "annotations" / "instances_val.json"
    good = json.loads((synth / "annotations" / "instances_val.json").read_text())
    broken = dict(good, annotations=[{k: v for k, v in a.items() if k != "bbox"} for a in good["annotations"]])
    ann.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="lacks field"):
        CocoDetection(root, "val")
    ann.write_text(json.dumps({k: v for k, v in good.items() if k != "categories"}))
    with pytest.raises(ValueError, match="'categories'"):
        CocoDetection(root, "val")
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(root, "val")
    ann.write_text(json.dumps(good))
    (root / "val" / good["images"][0]["file_name"]).write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image"):
        CocoDetection(root, "val")[0]
    with pytest.raises(FileNotFoundError, match="no COCO annotation file"):
        CocoDetection(root, "test")
