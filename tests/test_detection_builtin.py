"""The committed built-in DETR: loads offline, has the advertised shape, is small, and its MLPs are found."""
import json

import torch

from dynsparse.detection.model import builtin_detr_dir, load_detr
from dynsparse.mlps import find_mlps


def test_builtin_detr_loads_and_has_relu_mlps():
    d = builtin_detr_dir()
    assert (d / "README.md").is_file() and (d / "preprocessor_config.json").is_file()
    assert (d / "model.safetensors").stat().st_size < 8 * 2**20
    model, proc = load_detr()
    cfg = model.config
    assert cfg.activation_function == "relu" and cfg.d_model == 128 and cfg.encoder_ffn_dim == 1024
    assert cfg.backbone_config.model_type == "resnet"
    blocks = find_mlps(model)
    assert len(blocks) == cfg.encoder_layers + cfg.decoder_layers
    assert all(b.d_ff == 1024 for b in blocks.values())
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 128, 128), pixel_mask=torch.ones(1, 128, 128, dtype=torch.long))
    assert out.logits.shape == (1, cfg.num_queries, len(cfg.id2label) + 1) and torch.isfinite(out.pred_boxes).all()
    info = json.loads((d / "train_info.json").read_text())
    assert info["history"], "training history recorded with the weights"


def test_batch_norm_forms_round_trip_exactly():
    import torch

    from dynsparse.detection.model import build_small_detr, freeze_batch_norm_, trainable_batch_norm_

    model = build_small_detr({0: "a", 1: "b"}, d_model=32, layers=1, d_ff=64).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
        assert trainable_batch_norm_(model) > 0
        model.eval()
        middle = model(pixel_values=pixels).logits
        assert freeze_batch_norm_(model) > 0
        after = model(pixel_values=pixels).logits
    torch.testing.assert_close(middle, before)
    torch.testing.assert_close(after, before)


def test_builtin_detr_detects_shapes_it_never_saw(tmp_path):
    # fresh images from the same generator (another seed): the committed model must be a working detector,
    # since every AP-vs-sparsity number in the docs is measured on it (val AP 0.695 on the built-in set)
    from dynsparse.detection.coco import CocoDetection
    from dynsparse.detection.evaluate import evaluate_detr
    from dynsparse.detection.synthetic import make_synthetic_coco

    root = make_synthetic_coco(tmp_path / "fresh", n_train=0, n_val=48, seed=123)
    model, proc = load_detr()
    stats = evaluate_detr(model, proc, CocoDetection(root, "val"), batch_size=8, verbose=False)
    assert stats["AP50"] > 0.7 and stats["AP"] > 0.4, stats


def test_importing_the_detr_module_prints_nothing():
    """Every sparsify and analyze run imports it (for the default model's path); transformers' warning about
    its processor's backend would be a stray line before each of their one-line errors."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", "import dynsparse.detection.model"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-2000:]
