"""``dynsparse study autoprune``: does hard routing starve subtrees, and which choices prevent it?"""
from __future__ import annotations

from ..cli import CLIError


def register(sub) -> None:
    p = sub.add_parser("study", help="controlled experiments on tree FF training dynamics")
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    a = studies.add_parser("autoprune", help="tree variants x learning rates x shapes x seeds: routing health on "
                           "held-out tokens, the sign/gradient mechanism, static pruning")
    a.add_argument("--out", default="runs/autoprune", help="study folder (one run per cell; default runs/autoprune)")
    a.add_argument("--quick", action="store_true", help="a tiny budget (a smoke test)")
    a.add_argument("--variants", help="comma-separated subset of node-gelu,node-relu,node-tanh,node-identity,path-gelu, "
                   "each optionally with +whiten (the tree input whitened while training, e.g. node-gelu+whiten)")
    a.add_argument("--lrs", help="comma-separated peak learning rates (default 3e-4,1e-3,3e-3)")
    a.add_argument("--warmup-frac", type=float, help="warm-up as a fraction of the run (default 0.05)")
    a.add_argument("--depths", help="comma-separated tree depths (default 7)")
    a.add_argument("--trees", help="comma-separated trees per layer (default 2)")
    a.add_argument("--seeds", help="comma-separated seeds of the sweep (default 0)")
    a.add_argument("--final-seeds", help="seeds to add at the sweep's best learning rate (the comparison cells)")
    a.add_argument("--max-steps", type=int, help="steps per run (default: the budget's)")
    a.add_argument("--d-model", type=int)
    a.add_argument("--n-layer", type=int)
    a.add_argument("--seq-len", type=int)
    a.add_argument("--batch-size", type=int)
    a.add_argument("--probe-every", type=int, help="steps between held-out probes (and telemetry snapshots)")
    a.add_argument("--heldout-windows", type=int, help="validation windows in the fixed held-out set")
    a.add_argument("--data", default="shakespeare", help="corpus (default: built-in Shakespeare)")
    a.add_argument("--prune", action="store_true", help="run `dynsparse prune` on each final model and report it")
    a.add_argument("--threads", type=int, help="torch and numba threads (default: torch's)")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=run_autoprune)


def _list(flag: str, text: str | None, kind):
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CLIError(f"{flag} {text!r} names no {flag.lstrip('-').removesuffix('s')}")
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise CLIError(f"{flag} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None


def run_autoprune(args) -> int:
    import sys
    from pathlib import Path

    from ..dynamics.study import SPEC_FILE, BUDGETS, StudySpec, prune_cells, run_study
    from ..dynamics.study_report import write_report
    from ..outputs import prepare_output
    from ..train.loop import RunDirError

    axes = {"variants": _list("--variants", args.variants, str), "lrs": _list("--lrs", args.lrs, float),
            "depths": _list("--depths", args.depths, int), "trees": _list("--trees", args.trees, int),
            "seeds": _list("--seeds", args.seeds, int), "final_seeds": _list("--final-seeds", args.final_seeds, int)}
    base = dict(BUDGETS["quick" if args.quick else "full"])
    over = {"max_steps": args.max_steps, "d_model": args.d_model, "n_layer": args.n_layer, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "probe_every": args.probe_every, "probe_windows": args.heldout_windows,
            "warmup_frac": args.warmup_frac}
    base.update({k: v for k, v in over.items() if v is not None})
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        base.update({k: v for k, v in axes.items() if v is not None})
        spec = StudySpec(data=args.data, **base)
        if not (Path(args.out) / SPEC_FILE).exists():  # a study folder of ours is checked by run_study
            prepare_output(args.out, "study", False, inputs=[args.data], reuse_own=True)
        log = (lambda line: print(line, file=sys.stderr, flush=True))
        done = run_study(args.out, spec, progress=not args.no_progress, log=log)
        prune_rows = prune_cells(args.out, spec, done["best_lr"], done["final_seeds"], log) if args.prune else None
        path = write_report(args.out, done["best_lr"], prune_rows)
    except (ValueError, TypeError, RunDirError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    print(path.read_text())
    print(f"report: {path}")
    return 0
