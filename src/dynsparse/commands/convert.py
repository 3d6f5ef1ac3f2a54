"""``dynsparse convert``: swap a pretrained causal LM's MLP blocks for tree FF layers (``treeify_``) and save
it, ready for ``dynsparse train --init-from OUT`` (the published protocol keeps the pretrained attention)."""
from __future__ import annotations

import json
from pathlib import Path

from ..cli import CLIError

MIN_CALIB_TOKENS = 32  # below this the held-out share that the reported error uses is a handful of tokens
DISTILL_DEFAULTS = {"--calib-data": "shakespeare", "--calib-tokens": 8192, "--calib-seq-len": 256,
                    "--distill-steps": 300, "--distill-lr": 3e-3, "--distill-batch": 1024, "--distill-inputs": "dense", "--distill-start": "random"}
CHOICES = {"--distill-inputs": ["dense", "sequential"], "--distill-start": ["random", "balanced"]}


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="replace a model's MLP blocks with tree FF layers", description=__doc__)
    p.add_argument("--model", required=True, help="a causal LM: an HF model dir, a .gguf file, a hub id "
                   "or a built-in name (smollm2-135m)")
    p.add_argument("--ff", default="tree", choices=["tree"], help="the new FF block")
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--trees", type=int, default=1)
    p.add_argument("--activation", default="gelu", choices=["gelu", "relu", "silu", "tanh", "identity"])
    p.add_argument("--act-position", default="node", choices=["node", "path"])
    p.add_argument("--init", default="random", choices=["random", "distill"],
                   help="tree weights: the published random init, or fitted layer by layer to each dense MLP's "
                   "output on calibration text (distill)")
    for flag, kind, text in (("--calib-data", str, "calibration corpus (its train split; forms as train --data)"),
                             ("--calib-tokens", int, "calibration tokens recorded, in windows spread over the split; every "
                              "layer's inputs are held at once (layers x tokens x d_model floats), and more tokens "
                              "fit other text better"),
                             ("--calib-seq-len", int, "calibration window length"),
                             ("--distill-steps", int, "optimizer steps per layer"),
                             ("--distill-lr", float, "Adam learning rate (cosine-decayed to a tenth)"),
                             ("--distill-batch", int, "tokens per distillation step"),
                             ("--distill-inputs", str, "each tree's inputs: recorded from the dense model (dense), or "
                              "read layer by layer behind the trees already fitted (sequential)"),
                             ("--distill-start", str, "the trees before the fit: as --seed builds them (random), or "
                              "each node's bias at the median of the tokens reaching it (balanced: none starts starved)")):
        p.add_argument(flag, type=kind, help=f"--init distill: {text} (default {DISTILL_DEFAULTS[flag]})",
                       **({"choices": CHOICES[flag]} if flag in CHOICES else {}))
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the trees' initial weights and the distillation's batches (default 0)")
    p.add_argument("--cache-dir", help="tokenized corpus cache (default ~/.cache/dynsparse)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model directory run its own Python code (auto_map); off by default")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lm.pretrained import resolve_model

    if args.model:  # a directory, a .gguf file, a hub id or a built-in name -> a local HF directory
        args.model = str(resolve_model(args.model))

    import torch

    import dynsparse.lm  # noqa: F401  registers the auto classes

    from ..lm.convert import check_convertible, check_tree_shape, convert_model, load_model, load_tokenizer_if_any, save_converted
    from ..tree import TreeConfig

    from ..outputs import prepare_output

    out = Path(args.out)
    if Path(args.model).resolve() == out.resolve():
        raise CLIError("--out must differ from --model")
    given = [f for f in DISTILL_DEFAULTS if getattr(args, _dest(f)) is not None]
    if args.init != "distill" and given:
        raise CLIError(f"{', '.join(given)} only apply with --init distill")
    for flag, value in DISTILL_DEFAULTS.items():
        if getattr(args, _dest(flag)) is None:
            setattr(args, _dest(flag), value)
    if not args.distill_lr > 0:  # here, not after the model loads and the inputs are recorded
        raise CLIError(f"--distill-lr must be > 0, got {args.distill_lr}")
    prepare_output(out, "model", args.overwrite, inputs=[args.model])
    extra = {}
    try:
        tree = TreeConfig(depth=args.depth, trees=args.trees, activation=args.activation, act_position=args.act_position)
        check_tree_shape(tree)
        ids = _calibration(args) if args.init == "distill" else None
        model = load_model(args.model, trust_remote_code=args.trust_remote_code)
        if getattr(model, "_dynsparse_tree", None) or getattr(model.config, "ff", "dense") == "tree":
            raise ValueError(f"{args.model} already has tree FF blocks")
        blocks = check_convertible(model, tree)
        torch.manual_seed(args.seed)
        if args.init == "distill":
            replaced, reports = _distill(args, model, tree, ids)
            extra["distill.json"] = json.dumps({"calib_data": args.calib_data, "inputs": args.distill_inputs,
                                                "start": args.distill_start, "layers": reports}, indent=1) + "\n"
        else:
            replaced = convert_model(model, tree)
        save_converted(model, out, load_tokenizer_if_any(args.model, args.trust_remote_code), extra=extra)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        raise CLIError(str(e)) from None
    layer = next(m for m in model.modules() if type(m).__name__ == "TreeFF")
    d_ff = next(iter(blocks.values())).d_ff
    print(f"replaced {len(replaced)} MLP blocks (d_ff {d_ff}) with depth-{args.depth} x {args.trees} trees "
          f"({args.trees * layer.nodes} units, {args.trees * (args.depth + 1)} active per token: "
          f"active fraction {layer.active_fraction:.2%}); saved to {out}")
    return 0


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _calibration(args):
    """(windows, seq) calibration token ids from the train split of --calib-data in the model's own tokens,
    spread over the split: trees fitted to a prefix (one play, one document) fit other text worse than
    that prefix's own held-out tokens suggest."""
    from ..data import prepare_tokens, spread_windows, text_source

    data = prepare_tokens(text_source(args.calib_data), tokenizer_dir=args.model, cache_dir=args.cache_dir)
    split = data.splits["train"]
    if min(len(split), args.calib_tokens) < MIN_CALIB_TOKENS:
        raise ValueError(f"--calib-data {args.calib_data}: no calibration tokens to speak of ({len(split)} in its "
                         f"train split); distillation needs at least {MIN_CALIB_TOKENS}")
    return spread_windows(split, args.calib_tokens, args.calib_seq_len)


def _distill(args, model, tree, ids):
    """Layer-wise distillation, one status line per layer."""
    from ..lm.distill import DistillConfig, convert_distilled

    windows, seq = ids.shape
    cfg = DistillConfig(steps=args.distill_steps, lr=args.distill_lr, batch_tokens=args.distill_batch,
                        seed=args.seed, inputs=args.distill_inputs, start=args.distill_start)
    print(f"distilling {tree.trees} x depth-{tree.depth} trees on {ids.numel():,} calibration tokens "
          f"({windows} x {seq}), {cfg.steps} steps per layer, inputs {cfg.inputs}, start {cfg.start}", flush=True)

    def log(r):
        print(f"  {r['layer']}: relative output error {r['rel_error_init']:.3f} -> {r['rel_error']:.3f} "
              f"(held out; train {r['rel_error_train']:.3f}, {r['seconds']:.1f} s)", flush=True)

    return convert_distilled(model, tree, ids, cfg, log=log)
