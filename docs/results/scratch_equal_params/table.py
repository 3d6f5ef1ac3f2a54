"""Usage: python table.py WORK_DIR OUT_DIR
Collect run.sh's per-seed `dynsparse compare` results into OUT_DIR/results.json and print the README's tables."""
import json
import statistics
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
seeds = {}
for d in sorted(work.glob("seed*")):
    if (d / "results.json").is_file():
        seeds[int(d.name[4:])] = json.loads((d / "results.json").read_text())["results"]
if not seeds:
    sys.exit(f"no finished seed*/results.json under {work}")
KEYS = ("val_loss", "val_ppl", "ff_active_fraction", "tokens_per_s", "params", "train_seconds", "dead_fraction",
        "path_entropy")


def spread(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


gaps = {s: r["tree"]["val_loss"] / r["dense"]["val_loss"] - 1 for s, r in seeds.items()}
summary = {"seeds": sorted(seeds), "per_seed": {s: {**{ff: {k: r[ff].get(k) for k in KEYS} for ff in r},
                                                    "loss_gap": gaps[s]} for s, r in seeds.items()},
           "loss_gap": spread(list(gaps.values()))}
for ff in ("dense", "tree"):
    summary[ff] = {k: spread([r[ff][k] for r in seeds.values()]) for k in KEYS
                   if all(r[ff].get(k) is not None for r in seeds.values())}
summary["gap_of_means"] = summary["tree"]["val_loss"]["mean"] / summary["dense"]["val_loss"]["mean"] - 1

print("| seed | dense val loss | tree val loss | gap | dense tok/s | tree tok/s |")
print("|---:|---:|---:|---:|---:|---:|")
for s, r in sorted(seeds.items()):
    print(f"| {s} | {r['dense']['val_loss']:.4f} | {r['tree']['val_loss']:.4f} | {gaps[s]:+.2%} | "
          f"{r['dense']['tokens_per_s']:,.0f} | {r['tree']['tokens_per_s']:,.0f} |")
d, t, g = summary["dense"], summary["tree"], summary["loss_gap"]
sd = lambda x, f: "" if x["std"] is None else f" ± {x['std']:{f}}"
print(f"| mean ± sd | {d['val_loss']['mean']:.4f}{sd(d['val_loss'], '.4f')} | {t['val_loss']['mean']:.4f}"
      f"{sd(t['val_loss'], '.4f')} | {g['mean']:+.2%}{sd(g, '.2%')} | {d['tokens_per_s']['mean']:,.0f} | "
      f"{t['tokens_per_s']['mean']:,.0f} |")
print(f"\nparameters: dense {d['params']['mean']:,.0f}, tree {t['params']['mean']:,.0f} "
      f"({t['params']['mean'] / d['params']['mean'] - 1:+.2%}); tree FF active fraction "
      f"{t['ff_active_fraction']['mean']:.2%}; gap range [{g['min']:+.2%}, {g['max']:+.2%}] over {g['n']} seeds")

# the gap over training, from the runs' periodic validation (4 batches of 16 x 128 tokens: noisy)
curves = {}
for s in seeds:
    for ff in ("dense", "tree"):
        for line in (work / f"seed{s}" / ff / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "val_loss" in r:
                curves.setdefault(r["step"], {}).setdefault(ff, []).append(r["val_loss"])
print("\n| step | dense val loss (mean) | tree val loss (mean) | gap |\n|---:|---:|---:|---:|")
over = []
for step in (300, 600, 1000, 1500, 2000, 2500, 3000):
    c = curves.get(step, {})
    if len(c.get("dense", [])) == len(c.get("tree", [])) == len(seeds):
        dm, tm = statistics.fmean(c["dense"]), statistics.fmean(c["tree"])
        over.append({"step": step, "dense": dm, "tree": tm, "gap": tm / dm - 1})
        print(f"| {step} | {dm:.3f} | {tm:.3f} | {tm / dm - 1:+.2%} |")
summary["gap_over_training"] = over
(out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
