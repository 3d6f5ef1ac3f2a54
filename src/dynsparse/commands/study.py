"""``dynsparse study autoprune``: does hard routing starve subtrees, and which choices prevent it?"""
from __future__ import annotations

from ..cli import CLIError


def register(sub) -> None:
    p = sub.add_parser("study", help="controlled experiments on tree FF training dynamics")
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    a = studies.add_parser("autoprune", help="per-node GELU/ReLU/tanh vs GELU after the path: dead nodes, entropy, loss")
    a.add_argument("--out", default="runs/autoprune", help="study folder (one run per variant; default runs/autoprune)")
    a.add_argument("--quick", action="store_true", help="a smaller budget (< 5 minutes on 2 CPU cores)")
    a.add_argument("--variants", help="comma-separated subset of node-gelu,node-relu,node-tanh,path-gelu")
    a.add_argument("--data", default="shakespeare", help="corpus (default: built-in Shakespeare)")
    a.add_argument("--max-steps", type=int, help="override the budget's steps")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--overwrite", action="store_true", help="retrain variants whose run folders exist")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=run_autoprune)


def run_autoprune(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..dynamics.study import run_study, study_configs, summarize_study, verdict, write_study_report
    from ..train.loop import RunDirError

    from ..outputs import prepare_output

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if variants == []:
        raise CLIError(f"--variants {args.variants!r} names no variant")
    if args.max_steps is not None and args.max_steps < 1:
        raise CLIError(f"--max-steps must be >= 1, got {args.max_steps}")
    try:
        configs = study_configs(args.quick, variants, args.seed, args.data, args.max_steps)
        prepare_output(args.out, "study", args.overwrite, inputs=[args.data], reuse_own=True)
        results = run_study(args.out, configs, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, RunDirError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    rows = summarize_study(args.out, results)
    path = write_study_report(args.out, rows, configs)
    table = Table(title="auto-pruning study (last snapshot, mean over layers)")
    for col in ("variant", "val loss", "dead", "static", "entropy", "eff. leaves"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], f"{r['val_loss']:.4f}", f"{r['dead_fraction']:.3f}", f"{r['static_fraction']:.3f}",
                      f"{r['path_entropy']:.3f}", f"{r['effective_leaves']:.1f}/{r['leaves']}")
    console = Console()
    console.print(table)
    console.print(verdict(rows))
    print(f"report: {path}")
    return 0
