"""The built-in small DETR: HF ``DetrForObjectDetection`` with a tiny HF ResNet backbone and ReLU MLPs.

Shaped like DETR-R50 (post-norm encoder/decoder, ReLU MLPs 8x wider than d_model, sine positions), only
smaller, so it trains on a CPU in an hour. The backbone is HF's own ResNet (``use_timm_backbone=False``,
randomly initialised: no hub download), feature map at stride 16 so a 128 px image gives 8x8 = 64 tokens.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
from transformers.utils import is_torchvision_available

if is_torchvision_available():
    from transformers import DetrImageProcessor
else:  # transformers >= 5 warns on every import when it falls back to its PIL processor; ask for that one
    try:
        from transformers import DetrImageProcessorPil as DetrImageProcessor
    except ImportError:  # transformers 4: one processor, PIL-based
        from transformers import DetrImageProcessor


def small_detr_config(id2label: dict[int, str], d_model: int = 128, layers: int = 3, d_ff: int = 1024,
                      num_queries: int = 16, heads: int = 4) -> DetrConfig:
    backbone = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
                            out_features=["stage3"])
    return DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
        d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_ffn_dim=d_ff, decoder_ffn_dim=d_ff,
        encoder_attention_heads=heads, decoder_attention_heads=heads, num_queries=num_queries,
        activation_function="relu", dropout=0.0, auxiliary_loss=True,
        id2label={int(k): v for k, v in id2label.items()}, label2id={v: int(k) for k, v in id2label.items()},
    )


def build_small_detr(id2label: dict[int, str], **kw) -> DetrForObjectDetection:
    """A freshly initialised small DETR whose backbone is trainable (HF freezes the first ResNet stages
    assuming pretrained weights; ours start random, so every parameter must learn)."""
    model = DetrForObjectDetection(small_detr_config(id2label, **kw))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def small_detr_processor(image_size: int = 128) -> DetrImageProcessor:
    """Images keep their size (<= image_size on the long side), ImageNet normalisation, padded + pixel mask."""
    return DetrImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size})


def builtin_detr_dir() -> Path:
    """Folder of the committed, trained small DETR (see its README.md for how it was made)."""
    return Path(str(resources.files("dynsparse") / "assets" / "detr"))


def load_detr(model_dir: str | os.PathLike | None = None):
    """(model in eval mode, image processor) from a saved directory; the built-in model by default."""
    d = Path(model_dir) if model_dir is not None else builtin_detr_dir()
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json: not a saved DETR model directory")
    import json

    try:
        config = json.loads((d / "config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "detr":
        raise ValueError(f"{d} holds a {kind!r} model, not a DETR (model_type 'detr')")
    if config.get("use_timm_backbone"):
        import importlib.util

        if importlib.util.find_spec("timm") is None:
            raise ValueError(f"{d}: this DETR uses a timm backbone and timm is not installed (pip install timm)")
    model = DetrForObjectDetection.from_pretrained(d, dtype="float32").eval()
    processor = DetrImageProcessor.from_pretrained(d)
    return model, processor


def _swap_norms(model, make) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = make(child)
            if new is not None:
                setattr(parent, name, new)
                n += 1
    return n


def trainable_batch_norm_(model) -> int:
    """Swap DETR's frozen batch norms for real ``nn.BatchNorm2d`` (same buffers) so a backbone trained from
    scratch normalises its features; without it our random backbone's features are tiny next to the
    positional embeddings and training collapses to one box for every query."""
    from torch import nn

    def make(m):
        if type(m).__name__ != "DetrFrozenBatchNorm2d":
            return None
        return _copy_norm_state(m, nn.BatchNorm2d(m.weight.numel()))

    return _swap_norms(model, make)


def _copy_norm_state(src, dst):
    """Affine parameters and running statistics from one batch-norm form to the other."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst, name).copy_(getattr(src, name))
    return dst


def freeze_batch_norm_(model) -> int:
    """The reverse: eval-mode ``nn.BatchNorm2d`` back to DETR's frozen form (identical output), so the saved
    model is a plain ``DetrForObjectDetection``."""
    from torch import nn
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

    def make(m):
        if not isinstance(m, nn.BatchNorm2d):
            return None
        return _copy_norm_state(m, DetrFrozenBatchNorm2d(m.num_features))

    return _swap_norms(model, make)
