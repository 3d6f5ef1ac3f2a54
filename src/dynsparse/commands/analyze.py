"""``dynsparse analyze``: per-layer MLP activation sparsity of a saved model on calibration data."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="measure MLP activation sparsity (table, JSON, PNG)",
                              description=__doc__)
    p.add_argument("--model", default=None, help="an HF model dir, a .gguf file, a hub id or a built-in "
                   "name (smollm2-135m); default: the built-in small DETR")
    p.add_argument("--calib", default=None, help="DETR: COCO-format root (default: the built-in synthetic set); "
                   "text models: a text file or folder, or shakespeare (the built-in plays, the default)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=128, help="images / lines to use")
    p.add_argument("--eps", type=float, default=1e-3, help="|a| <= eps counts as near zero")
    p.add_argument("--activity", choices=("sign", "contribution", "cats"), default="sign",
                   help="what counts as active: act(gate) > 0 (sign), |act(g) u| * ||W_down[:, j]|| above the "
                        "layer's threshold (contribution), or |act(g)| above it (cats)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="contribution/cats: calibrate each layer's threshold to switch this share off (in [0, 1))")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="write analysis.json, sparsity.png, firing_hist.png here")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds something else")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a model directory run its own Python code (auto_map); off by default")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lm.pretrained import resolve_model

    if args.model:  # a directory, a .gguf file, a hub id or a built-in name -> a local HF directory
        args.model = str(resolve_model(args.model))

    from pathlib import Path

    from ..cli import CLIError
    from ..detection.model import builtin_detr_dir
    from ..gating.analyze import plot, print_table, summarize, write_json
    from ..gating.calib import calib_batches, default_calib, load_model
    from ..gating.record import record_activations

    model_dir = Path(args.model) if args.model else builtin_detr_dir()
    if args.eps < 0:
        raise CLIError(f"--eps must be >= 0, got {args.eps}")
    if args.activity == "sign" and args.target_sparsity is not None:
        raise CLIError("--target-sparsity calibrates --activity contribution or cats; sign has no threshold")
    if args.activity != "sign":
        if args.target_sparsity is None:
            raise CLIError(f"--activity {args.activity} needs --target-sparsity (the share each layer's threshold "
                           "switches off)")
        if not 0 <= args.target_sparsity < 1:
            raise CLIError(f"--target-sparsity must be in [0, 1), got {args.target_sparsity}")
    if args.out:
        from ..outputs import prepare_output

        prepare_output(args.out, "analyze", args.overwrite, inputs=[model_dir, args.calib], reuse_own=True)
    try:
        model, proc, kind = load_model(model_dir, trust_remote_code=args.trust_remote_code)
        data = args.calib if args.calib is not None else default_calib(kind)
        batches = calib_batches(kind, proc, data, args.batch_size, args.limit, split=args.split)
        stats = record_activations(model, batches, eps=args.eps, activity=args.activity,
                                   target_sparsity=args.target_sparsity)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    rows = summarize(stats)
    print_table(rows, title=f"MLP activation sparsity of {model_dir}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(rows, out / "analysis.json")
        for p in plot(stats, out):
            print(f"wrote {p}")
        print(f"wrote {out / 'analysis.json'}")
    return 0
