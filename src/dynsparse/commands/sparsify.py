"""``dynsparse sparsify``: fit SIBS, MGS or CATS on calibration data and write the model + gates to --out
(a causal LM's --out also loads with ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("sparsify", help="fit SIBS or MGS gates for a saved model", description=__doc__)
    p.add_argument("--model", default=None, help="an HF model dir, a .gguf file, a hub id or a built-in "
                   "name (smollm2-135m); default: the built-in small DETR")
    p.add_argument("--method", choices=("sibs", "mgs", "cats"), required=True,
                   help="sibs: static slicing; mgs: trained gates; cats: threshold on |act(gate)| (gated MLPs, "
                        "needs --target-sparsity, nothing trained)")
    p.add_argument("--activity", choices=("sign", "contribution", "cats"), default="sign",
                   help="SIBS/MGS: what counts as an active neuron: act(gate) > 0 (sign), its contribution "
                        "|act(g) u| * ||W_down[:, j]|| above the layer's threshold, or |act(g)| above it (cats); "
                        "contribution is the one to use for SiLU/GELU gated MLPs")
    p.add_argument("--activity-sparsity", type=float, default=None,
                   help="contribution/cats: the share of pairs each layer's activity threshold switches off "
                        "(default: --target-sparsity)")
    p.add_argument("--calib", default=None, help="DETR: COCO-format root (default: the built-in synthetic set); "
                   "text models: a text file or folder, one example per line, or shakespeare (the built-in plays' "
                   "lines, the default)")
    p.add_argument("--calib-split", default="train")
    p.add_argument("--calib-limit", type=int, default=256, help="images / lines of calibration data to use")
    p.add_argument("--out", required=True, help="output dir: model files + gates.safetensors + sparsify_report.json")
    p.add_argument("--threshold", type=float, default=None, help="SIBS: remove neurons firing less often than this")
    p.add_argument("--target-sparsity", type=float, default=None, help="SIBS or MGS: share to switch off")
    p.add_argument("--target-recall", type=float, default=None, help="MGS: share of active neurons to keep (default 0.99)")
    p.add_argument("--criterion", choices=("frequency", "output_error"), default="frequency",
                   help="SIBS: remove the least often firing neurons (the paper), or those whose removal adds the "
                        "least squared error to the block output (needs --target-sparsity)")
    p.add_argument("--gate", choices=("lowrank", "grouped", "lowbit"), default="lowrank",
                   help="MGS: a trained low-rank or grouped gate, or lowbit: the contribution from --bits-bit copies "
                        "of the gate and up projections (no training; use with --activity contribution)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--bits", type=int, default=3, help="lowbit gate: bits per weight (<= 4 for the C++ decode op)")
    p.add_argument("--quant-group", type=int, default=32,
                   help="lowbit gate: input weights per scale and offset (32 for the C++ decode op)")
    p.add_argument("--smoothing", type=float, default=0.5,
                   help="lowbit gate: input channels scaled by rms(x)^smoothing before quantizing")
    p.add_argument("--no-reorder", action="store_true",
                   help="grouped gates: keep the neurons' order (default: co-firing neurons are moved into shared groups)")
    p.add_argument("--steps", type=int, default=300, help="MGS: gate training steps (all blocks train together)")
    p.add_argument("--gate-batch-size", type=int, default=1024,
                   help="MGS: calibration rows per training step (fewer: cheaper steps on a small CPU)")
    p.add_argument("--no-compensate", action="store_true", help="do not add back skipped neurons' mean output")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
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
    from ..gating import CATSConfig, MGSConfig, SIBSConfig, fit_gates, save_sparsified_dir
    from ..gating.calib import calib_batches, default_calib, load_model

    model_dir = Path(args.model) if args.model else builtin_detr_dir()
    out = Path(args.out)
    if out.resolve() == model_dir.resolve():
        raise CLIError("--out must differ from --model (the dense model is never overwritten)")
    from ..outputs import prepare_output

    prepare_output(out, "sparsify", args.overwrite, inputs=[model_dir, args.calib])
    try:
        if args.method != "cats" and args.activity == "sign" and args.activity_sparsity is not None:
            raise CLIError("--activity-sparsity calibrates --activity contribution or cats; sign has no threshold")
        if args.method == "cats":
            if args.target_sparsity is None:
                raise CLIError("cats needs --target-sparsity")
            extra = [f for f, v in (("--threshold", args.threshold), ("--target-recall", args.target_recall),
                                    ("--activity-sparsity", args.activity_sparsity)) if v is not None]
            if extra or args.activity != "sign":
                raise CLIError(f"{(extra or ['--activity'])[0]} does not apply to --method cats "
                               "(its activity is |act(gate)| at --target-sparsity)")
            cfg = CATSConfig(target_sparsity=args.target_sparsity, compensate=not args.no_compensate)
        elif args.method == "sibs":
            if args.threshold is None and args.target_sparsity is None:
                raise CLIError("sibs needs --threshold or --target-sparsity")
            if args.target_recall is not None:
                raise CLIError("--target-recall is an MGS option; SIBS takes --threshold or --target-sparsity")
            cfg = SIBSConfig(threshold=args.threshold, target_sparsity=args.target_sparsity, criterion=args.criterion,
                             compensate=not args.no_compensate, activity=args.activity,
                             activity_sparsity=args.activity_sparsity)
        else:
            if args.threshold is not None:
                raise CLIError("--threshold is a SIBS option; MGS takes --target-recall or --target-sparsity")
            if args.no_reorder and args.gate != "grouped":
                raise CLIError("--no-reorder applies to --gate grouped only")
            cfg = MGSConfig(gate=args.gate, rank=args.rank, group_size=args.group_size, bits=args.bits,
                            quant_group=args.quant_group, smoothing=args.smoothing,
                            target_recall=args.target_recall, target_sparsity=args.target_sparsity,
                            steps=args.steps, batch_size=args.gate_batch_size, compensate=not args.no_compensate,
                            reorder=False if args.no_reorder else None, activity=args.activity,
                            activity_sparsity=args.activity_sparsity)
        model, proc, kind = load_model(model_dir, trust_remote_code=args.trust_remote_code)
        calib_path = args.calib if args.calib is not None else default_calib(kind)
        calib = calib_batches(kind, proc, calib_path, args.batch_size, args.calib_limit, split=args.calib_split)
        gates = fit_gates(model, cfg, calib)
        save_sparsified_dir(gates, out, model_dir)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    for name, r in gates.report.items():
        if args.method == "sibs":
            print(f"{name}: kept {r['kept']} neurons ({r['removed_fraction']:.1%} removed), "
                  f"natural sparsity {r['natural_sparsity']:.1%}")
        elif args.method == "cats":
            print(f"{name}: |act(gate)| threshold {r['threshold']:.4g}, {r['calibrated_sparsity']:.1%} of the "
                  "calibration pairs off")
        else:
            print(f"{name}: gated density {r['gated_density']:.1%} (natural {r['natural_density']:.1%}), "
                  f"recall {r['recall']:.3f}, precision {r['precision']:.3f} on held-out rows")
    print(f"wrote {out}")
    return 0
