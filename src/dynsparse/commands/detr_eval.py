"""``dynsparse detr-eval``: COCO AP of a DETR model (dense or with saved SIBS/MGS gates), via pycocotools."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("detr-eval", help="COCO-evaluate a DETR model, optionally sparsified",
                              description=__doc__)
    p.add_argument("--model", default=None, help="saved DetrForObjectDetection dir or hub id "
                   "(default: the built-in small DETR)")
    p.add_argument("--coco", default=None, help="COCO-format root with annotations/instances_<split>.json and "
                   "<split>/ images (default: the built-in synthetic set, generated on first use)")
    p.add_argument("--split", default="val")
    p.add_argument("--sparsify", default=None, metavar="GATES_DIR", help="dir with gates.safetensors (from dynsparse sparsify)")
    p.add_argument("--batch-size", type=int, default=8, help="same for dense and sparse runs: padding changes AP")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the stats and timings to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lm.pretrained import resolve_model

    if args.model:  # a directory, a .gguf file, a hub id or a built-in name -> a local HF directory
        args.model = str(resolve_model(args.model))

    import torch

    from ..cli import CLIError
    from ..detection.coco import CocoDetection
    from ..detection.evaluate import evaluate_detr
    from ..detection.model import load_detr
    from ..detection.synthetic import default_synthetic_root
    from ..gating import load_gates
    from ..gating.modules import GatedMLP
    from ..mlps import find_mlps

    from ..outputs import check_output_file, json_with_keys

    if args.json:  # before the evaluation, not after it; an earlier result is replaced, nothing else
        check_output_file(args.json, inputs=[args.model, args.coco, args.sparsify], own=json_with_keys("stats", "timing"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    try:
        model, proc = load_detr(args.model)
        names = list(find_mlps(model))
        root = args.coco if args.coco is not None else default_synthetic_root()
        ds = CocoDetection(root, args.split, limit=args.limit)
        if len(ds) == 0:
            raise CLIError(f"{root}: split {args.split!r} has no images")
        if args.sparsify:
            gates = load_gates(model, args.sparsify)
            print(f"applied {gates.method.upper()} gates from {args.sparsify} to {len(gates.layers)} MLP blocks")
        timing: dict = {}
        stats = evaluate_detr(model, proc, ds, batch_size=args.batch_size, timing=timing, mlp_names=names)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    gated = [m for m in model.modules() if isinstance(m, GatedMLP)]
    if gated:
        timing["mlp_gated_density"] = sum(m.computed for m in gated) / max(sum(m.total for m in gated), 1)
    print(f"{len(ds)} images, batch {args.batch_size}: model {timing['model_seconds']:.2f} s, "
          f"MLP blocks {timing['mlp_seconds']:.2f} s"
          + (f", MLP density {timing['mlp_gated_density']:.1%}" if gated else ""))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"stats": stats, "timing": timing}, indent=1))
    return 0
