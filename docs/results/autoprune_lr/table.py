"""The learning-rate grid as one table per depth: this folder's cells (3e-4, 1e-3) beside v3's (3e-3).

Usage: python table.py  (reads d7/, d11/ here and ../autoprune_v3/; prints markdown)."""
import json
from pathlib import Path

HERE = Path(__file__).parent
PRUNED = "params_before", "params_after"


def cells(folder: Path) -> list[dict]:
    study = json.loads((folder / "study.json").read_text())
    pruned = {}
    for p in study.get("prune", []):
        pruned.setdefault((p["variant"], p["run"].split("-lr")[1].split("-")[0]), []).append(
            1 - p["params_after"] / p["params_before"])
    for c in study["cells"]:
        c["pruned"] = pruned.get((c["variant"], f"{c['lr']:g}"), [])
    return study["cells"]


def fmt(s: dict, pct=False) -> str:
    k = 100 if pct else 1
    f = ".1f" if pct else ".3f"
    return f"{s['mean'] * k:{f}} [{s['min'] * k:{f}}, {s['max'] * k:{f}}]"


def table(depth: str) -> str:
    rows = cells(HERE / depth)
    v3 = HERE.parent / "autoprune_v3" / depth
    rows += [c for c in cells(v3) if c["variant"] in {r["variant"] for r in rows}]
    rows.sort(key=lambda c: (c["variant"], c["lr"]))
    out = ["| variant | lr | seeds | val loss | dead % | peak dead % | grad ratio +/- | params pruned % |",
           "|---|---:|---|---|---|---|---|---|"]
    for c in rows:
        g = c["grad_ratio_rms"]
        ratio = "-" if g["mean"] == float("inf") else f"{g['mean']:.2f}"
        pr = f"{100 * min(c['pruned']):.1f}-{100 * max(c['pruned']):.1f}" if c["pruned"] else "-"
        out.append(f"| {c['variant']} | {c['lr']:g} | {len(c['seeds'])} | {fmt(c['val_loss'])} | "
                   f"{fmt(c['dead_fraction'], True)} | {fmt(c['peak_dead'], True)} | {ratio} | {pr} |")
    return "\n".join(out)


if __name__ == "__main__":
    for depth in ("d7", "d11"):
        if (HERE / depth / "study.json").is_file():
            print(f"## {depth}\n\n{table(depth)}\n")
