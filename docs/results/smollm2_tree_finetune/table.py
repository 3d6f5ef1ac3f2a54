"""Usage: python table.py WORK_DIR OUT_DIR
Collect run.sh's outputs into OUT_DIR/results.json and print the markdown table of the README."""
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
ROWS = [("original dense", "smollm2-135m", None), ("dense fine-tuned", "dense_ft", "dense_ft.json"),
        ("tree 8x7, converted (published init)", "tree8x7_random", None),
        ("tree 8x7, distilled", "tree8x7", None), ("tree 8x7, distilled + fine-tuned", "tree8x7_ft", "tree8x7_ft.json"),
        # run_seeds.sh: a second seed, and the fine-tuning with everything trainable
        ("dense fine-tuned, all trainable", "dense_ft_all", "dense_ft_all.json"),
        ("tree 8x7 seed 1, distilled", "tree8x7_s1", None),
        ("tree 8x7 seed 1, distilled + fine-tuned", "tree8x7_s1_ft", "tree8x7_s1_ft.json"),
        ("tree 8x7 seed 1, distilled + fine-tuned, all trainable", "tree8x7_s1_ft_all", "tree8x7_s1_ft_all.json"),
        # run_calib65k.sh: 65,536 calibration tokens spread over the split, seeds 0, 1 and 2
        ("tree 8x7, 65k calibration, distilled", "tree8x7_c65k", None),
        ("tree 8x7, 65k calibration, distilled + fine-tuned", "tree8x7_c65k_ft", "tree8x7_c65k_ft.json"),
        ("tree 8x7, 65k calibration seed 1, distilled", "tree8x7_c65k_s1", None),
        ("tree 8x7, 65k calibration seed 1, distilled + fine-tuned", "tree8x7_c65k_s1_ft", "tree8x7_c65k_s1_ft.json"),
        ("tree 8x7, 65k calibration seed 2, distilled", "tree8x7_c65k_s2", None),
        ("tree 8x7, 65k calibration seed 2, distilled + fine-tuned", "tree8x7_c65k_s2_ft", "tree8x7_c65k_s2_ft.json"),
        # run_ft_sweep.sh: the fine-tuning's learning rate, then 4x the tokens at each model's best rate
        ("tree 8x7, 65k calibration, fine-tuned at lr 1e-3", "tree8x7_c65k_ft_lr1e-3", "tree8x7_c65k_ft_lr1e-3.json"),
        ("dense fine-tuned at lr 1e-3", "dense_ft_lr1e-3", "dense_ft_lr1e-3.json"),
        ("tree 8x7, 65k calibration, fine-tuned at lr 3e-3", "tree8x7_c65k_ft_lr3e-3", "tree8x7_c65k_ft_lr3e-3.json"),
        ("dense fine-tuned at lr 3e-3", "dense_ft_lr3e-3", "dense_ft_lr3e-3.json"),
        ("tree 8x7, 65k calibration, fine-tuned 160 steps at lr 1e-3", "tree8x7_c65k_ft160", "tree8x7_c65k_ft160.json"),
        ("dense fine-tuned 160 steps at lr 3e-4", "dense_ft160", "dense_ft160.json"),
        # run_sequential.sh: each tree distilled on the inputs the trees before it give, then the 160-step fine-tuning
        ("tree 8x7, 65k calibration, sequential, distilled", "tree8x7_c65k_seq", None),
        ("tree 8x7, 65k calibration, sequential, fine-tuned 160 steps at lr 1e-3", "tree8x7_c65k_seq_ft160",
         "tree8x7_c65k_seq_ft160.json"),
        ("tree 8x7, 65k calibration, sequential seed 1, distilled", "tree8x7_c65k_seq_s1", None),
        ("tree 8x7, 65k calibration, sequential seed 1, fine-tuned 160 steps at lr 1e-3", "tree8x7_c65k_seq_s1_ft160",
         "tree8x7_c65k_seq_s1_ft160.json"),
        ("tree 8x7, 65k calibration, sequential, balanced start, distilled", "tree8x7_c65k_seq_balanced", None),
        ("tree 8x7, 65k calibration, sequential, balanced start, fine-tuned 160 steps at lr 1e-3",
         "tree8x7_c65k_seq_balanced_ft160", "tree8x7_c65k_seq_balanced_ft160.json"),
        # run_shape.sh: twice the trees (and active units) at the same active share, dense inputs, 160 steps
        ("tree 16x7, 65k calibration, distilled", "tree16x7_c65k", None),
        ("tree 16x7, 65k calibration, fine-tuned 160 steps at lr 1e-3", "tree16x7_c65k_ft160",
         "tree16x7_c65k_ft160.json"),
        ("tree 32x7, 65k calibration, distilled", "tree32x7_c65k", None),
        ("tree 32x7, 65k calibration, fine-tuned 160 steps at lr 1e-3", "tree32x7_c65k_ft160",
         "tree32x7_c65k_ft160.json")]


def load(path):
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


results = []
for label, tag, train in ROWS:
    row = {"model": label, "tag": tag}
    for corpus in ("macbeth", "narratives"):
        ev = load(work / f"eval_{tag}.{corpus}.json")
        if ev:
            row[corpus] = {k: ev.get(k) for k in ("perplexity", "loss", "tokens", "ff_active_fraction",
                                                  "ff_flops_per_token", "reference_perplexity", "kl_to_dense")}
    if train and load(work / train):
        t = load(work / train)
        row["fine_tune"] = {k: t.get(k) for k in ("steps", "tokens", "train_loss", "val_loss", "tokens_per_s",
                                                  "train_seconds", "params", "trainable_params")}
    if len(row) > 2:  # a row whose runs are absent is left out
        results.append(row)
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps(results, indent=1))

base = {c: (results[0].get(c) or {}).get("perplexity") for c in ("macbeth", "narratives")}
ft = {c: (results[1].get(c) or {}).get("perplexity") for c in ("macbeth", "narratives")}
print("| model | Macbeth ppl | vs fine-tuned dense | KL to original | narratives ppl | vs fine-tuned dense | "
      "FF active (measured) | FF FLOPs/token/block |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in results:
    cells = [r["model"]]
    for c in ("macbeth", "narratives"):
        ev = r.get(c) or {}
        p = ev.get("perplexity")
        cells.append("" if p is None else f"{p:.3g}" if p >= 1e5 else f"{p:.2f}")
        r_ = None if p is None or not ft[c] else p / ft[c]
        cells.append("" if r_ is None else f"{r_:.3g}x" if r_ >= 2 else f"{r_ - 1:+.1%}")
        if c == "macbeth":
            kl = ev.get("kl_to_dense")
            cells.append("" if kl is None else f"{kl:.3f}")
    ev = r.get("macbeth") or {}
    cells.append("" if ev.get("ff_active_fraction") is None else f"{ev['ff_active_fraction']:.2%}")
    cells.append("" if ev.get("ff_flops_per_token") is None else f"{ev['ff_flops_per_token']:,.0f}")
    print("| " + " | ".join(cells) + " |")
