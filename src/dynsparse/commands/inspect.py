"""``dynsparse inspect <run dir>``: routing report of a (finished or live) tree-model run."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..cli import CLIError


def register(sub) -> None:
    p = sub.add_parser("inspect", help="report how a run's tree layers routed over training (inspect.md + PNGs)")
    p.add_argument("run", help="a run directory written by `dynsparse train`")
    p.add_argument("--out", help="report folder (default: <run>/inspect)")
    p.add_argument("--layers", type=int, default=2, help="how many layers to draw in detail (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder that holds something else")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..dynamics.report import summary_rows, write_inspect_report
    from ..dynamics.telemetry_log import TelemetryError, load_telemetry
    from ..outputs import prepare_output

    if args.layers < 1:
        raise CLIError(f"--layers must be >= 1, got {args.layers}")
    out = args.out if args.out is not None else str(Path(args.run) / "inspect")
    # An earlier report is refreshed; anything else (the run itself, a file, other files) is kept.
    prepare_output(out, "inspect", args.overwrite, inputs=[args.run], reuse_own=True)
    try:
        layers = load_telemetry(args.run)
        path = write_inspect_report(args.run, args.out, args.layers)
    except TelemetryError as e:
        raise CLIError(str(e)) from None
    table = Table(title=f"routing at the last snapshot ({args.run})")
    for col in ("layer", "step", "dead", "static", "entropy", "eff. leaves", "Δ entropy"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in summary_rows(layers):
        table.add_row(r["layer"].replace("transformer.", "").replace(".mlp", ""), str(r["step"]), f"{r['dead_fraction']:.3f}", f"{r['static_fraction']:.3f}",
                      f"{r['path_entropy']:.3f}", f"{r['effective_leaves']:.1f}", f"{r['entropy_change']:+.3f}")
    Console().print(table)
    print(f"report: {path}")
    return 0
