"""Human-readable benchmark output: one line per case as it finishes, then the machine and a summary."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


class Printer:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(width=220)
        self.rows = []

    def row(self, r: dict) -> None:
        self.rows.append(r)
        met = "" if r["met"] is None else ("met" if r["met"] else "NOT met")
        target = "" if r["target"] is None else f" (target >= {r['target']:g}x: {met})"
        self.console.print(
            f"[bold]{r['case']}[/bold] vs {r['baseline']}: {_fmt_ms(r['baseline_ms'])} -> {_fmt_ms(r['dynsparse_ms'])}"
            f" = {r['ratio']:.1f}x{target}"
        )
        kernel = r["extra"].get("kernel_only_ms")
        if kernel:
            self.console.print(f"    (numba kernel alone, without the module's Python: {_fmt_ms(kernel)} = "
                               f"{r['baseline_ms'] / kernel:.1f}x)")
        fp32 = r["extra"].get("fp32_tree_ms")
        if fp32:
            self.console.print(f"    (the same layer in fp32: {_fmt_ms(fp32)}; bf16 weights are "
                               f"{r['extra']['bf16_over_fp32_speedup']:.2f}x as fast)")
        ceiling = r["extra"].get("ceiling_ratio")
        if ceiling:
            self.console.print(f"    (the dense LM with its FF blocks removed: {_fmt_ms(r['extra']['no_ff_ms'])} = "
                               f"{ceiling:.2f}x, the most any FF block can gain in this model)")
        picked = r["extra"].get("dispatch_picks")
        if picked:
            verdict = "the faster one" if r["extra"]["dispatch_right"] else f"but {r['extra']['faster']} is faster"
            self.console.print(f"    (strategy='auto' picks {picked}: {verdict})")

    def finish(self, report: dict) -> None:
        m = report["machine"]
        table = Table(title=f"dynsparse bench on {m['cpu']}, {m['threads']} threads, fp32")
        for col in ("case", "baseline", "base ms", "ours ms", "ratio", "target", "GFLOP/s", "GB/s", "base GFLOP/s"):
            table.add_column(col, justify="left" if col in ("case", "baseline") else "right")
        for r in self.rows:
            target = "" if r["target"] is None else f">={r['target']:g}x {'ok' if r['met'] else 'MISS'}"
            table.add_row(r["case"], r["baseline"], f"{r['baseline_ms']:.3f}", f"{r['dynsparse_ms']:.3f}",
                          f"{r['ratio']:.1f}x", target, f"{r['gflops']:.1f}", f"{r['gbps']:.1f}",
                          f"{r['baseline_gflops']:.1f}")
        self.console.print(table)
        self.console.print(f"machine peaks (same run): matmul {m['matmul_gflops']:.1f} GFLOP/s, "
                           f"memory copy {m['memory_gbps']:.1f} GB/s, row-gather ceiling (numba dot+axpy on "
                           f"L1-resident rows) {m['gather_ceiling_gflops']:.1f} GFLOP/s; total {report['seconds']:.0f} s")
        load = m.get("load_average_1min")
        if load is not None and m.get("cores") and load > m["cores"]:
            self.console.print(f"[yellow]warning: load average {load:.1f} on {m['cores']} cores when the run began: "
                               "other processes share these cores and skew the timings[/yellow]")
        for name, err in report["errors"].items():
            self.console.print(f"[red]suite {name} not run: {err}[/red]")
