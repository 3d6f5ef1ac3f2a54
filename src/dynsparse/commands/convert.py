"""``dynsparse convert``: swap a pretrained causal LM's MLP blocks for tree FF layers (``treeify_``) and save
it, ready for ``dynsparse train --init-from OUT`` (the published protocol keeps the pretrained attention)."""
from __future__ import annotations

from pathlib import Path

from ..cli import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="replace a model's MLP blocks with tree FF layers", description=__doc__)
    p.add_argument("--model", required=True, help="a causal LM: an HF model dir, a .gguf file, a hub id "
                   "or a built-in name (smollm2-135m)")
    p.add_argument("--ff", default="tree", choices=["tree"], help="the new FF block")
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--trees", type=int, default=1)
    p.add_argument("--activation", default="gelu", choices=["gelu", "relu", "silu", "tanh", "identity"])
    p.add_argument("--act-position", default="node", choices=["node", "path"])
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model directory run its own Python code (auto_map); off by default")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lm.pretrained import resolve_model

    if args.model:  # a directory, a .gguf file, a hub id or a built-in name -> a local HF directory
        args.model = str(resolve_model(args.model))

    import dynsparse.lm  # noqa: F401  registers the auto classes

    from ..lm.convert import convert_model, load_model, load_tokenizer_if_any, save_converted
    from ..tree import TreeConfig

    from ..outputs import prepare_output

    out = Path(args.out)
    if Path(args.model).resolve() == out.resolve():
        raise CLIError("--out must differ from --model")
    prepare_output(out, "model", args.overwrite, inputs=[args.model])
    try:
        tree = TreeConfig(depth=args.depth, trees=args.trees, activation=args.activation, act_position=args.act_position)
        model = load_model(args.model, trust_remote_code=args.trust_remote_code)
        if getattr(model, "_dynsparse_tree", None) or getattr(model.config, "ff", "dense") == "tree":
            raise ValueError(f"{args.model} already has tree FF blocks")
        replaced = convert_model(model, tree)
        save_converted(model, out, load_tokenizer_if_any(args.model, args.trust_remote_code))
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        raise CLIError(str(e)) from None
    layer = next(m for m in model.modules() if type(m).__name__ == "TreeFF")
    print(f"replaced {len(replaced)} MLP blocks with depth-{args.depth} x {args.trees} trees "
          f"(active fraction {layer.active_fraction:.2%}); saved to {out}")
    return 0
