"""``dynsparse prune <run dir> --out <dir>``: turn a trained tree LM's static routing into structure."""
from __future__ import annotations

from ..cli import CLIError


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune the unused subtrees of a trained tree LM and save the smaller model")
    p.add_argument("run", help="a finished `dynsparse train` run directory (with final/)")
    p.add_argument("--out", required=True, help="where to save the pruned HF model directory")
    p.add_argument("--calib-windows", type=int, default=64, help="training-split windows to count routing on")
    p.add_argument("--val-windows", type=int, default=32, help="validation windows for the held-out change")
    p.add_argument("--min-visits", type=int, default=1, help="keep nodes that saw at least this many tokens")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import math

    from ..dynamics.prune_run import PruneRunError, prune_run

    try:
        r = prune_run(args.run, args.out, args.calib_windows, args.val_windows, args.min_visits, args.overwrite)
    except (PruneRunError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(f"pruned {r.layers} tree layers: nodes {r.nodes_before} -> {r.nodes_after}, "
          f"parameters {r.params_before:,} -> {r.params_after:,} ({r.params_removed:,} removed)")
    print(f"calibration loss ({r.calib_tokens} tokens): {r.calib_loss_before:.5f} -> {r.calib_loss_after:.5f} "
          f"(perplexity {math.exp(r.calib_loss_before):.3f} -> {math.exp(r.calib_loss_after):.3f})")
    print(f"validation loss (held out): {r.val_loss_before:.5f} -> {r.val_loss_after:.5f} "
          f"({r.val_loss_after - r.val_loss_before:+.5f}; perplexity {math.exp(r.val_loss_before):.3f} -> "
          f"{math.exp(r.val_loss_after):.3f})")
    print(f"saved: {args.out}")
    return 0
