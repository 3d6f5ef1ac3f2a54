"""``dynsparse compare``: train a dense and a tree-FF model of the same width on the same data and budget,
then print a table and write ``report.md`` with loss curves and routing plots (what ``make demo`` runs).

Rerunning with the same settings continues unfinished runs (finished ones are reused); different
settings in an existing directory are refused unless ``--overwrite``.
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

from ..cli import CLIError
from .train import add_model_flags, config_from_args

# Demo defaults (tiny preset: d_model 128, 4 layers, dense FF width 512, BPE 2048; 600 steps of 16 x 128 tokens).
# Measured with these defaults (2 threads, lightly shared 2-core machine, 6 min 47 s in all): dense val loss
# 4.326, tree (depth 7 x 4 trees, identity per node, 3.14 % active, 16 x fewer FF FLOPs, 1.61 M vs 1.09 M
# parameters) 4.393, i.e. +1.56 %. With 2 trees the same choices gave +3.22 % (4.465). Screening (300 steps,
# tree vs dense): the published init/lr gave a tree no better than a model with no FF block at all; what
# closed the gap is w_out initialised like the dense fc2 plus a 10x learning rate on the tree tables
# (deep nodes see 1/2**level of the tokens), and the identity node activation. The dense model's FF lr
# multiplier was tuned too (x3 beats x1 and x10; 600 steps: 4.326 vs 4.342 at x1). Those runs used the
# reference (masked) backend; the tree ops' numba training kernels compute the same function and are now
# faster at this width, so the demo trains on the default backend.
DEMO_DEFAULTS = dict(depth=7, trees=4, max_steps=600, seq_len=128, batch_size=16, lr=3e-3, warmup_steps=50,
                     eval_every=100, eval_batches=4, telemetry_every=50)
# Per-model optimisation choices, each tuned for its own model (see the comment above).
DEMO_FF_DEFAULTS = {"dense": dict(ff_lr_scale=3.0),
                    "tree": dict(activation="identity", tree_out_init="residual", ff_lr_scale=10.0)}


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="train dense and tree FF models side by side and report",
                              description=__doc__)
    add_model_flags(p)
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--overwrite", action="store_true", help="replace a different comparison in --out")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--val-windows", type=int, default=256, help="validation windows for the final numbers")
    p.add_argument("--max-gap", type=float, default=0.03, help="target: tree val loss at most this much above dense")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from ..data import prepare_tokens, text_source
    from ..eval import evaluate_lm
    from ..eval.report import print_table, verdict, verdict_line, write_report
    from ..train import CheckpointError, RunDirError, train
    from ..train.telemetry import read_jsonl

    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    configs = {}
    for ff in ("dense", "tree"):
        wanted = {**DEMO_DEFAULTS, **DEMO_FF_DEFAULTS[ff]}
        defaults = {k: v for k, v in wanted.items() if getattr(args, k, None) is None}  # flags win
        configs[ff] = config_from_args(args, ff=ff, **defaults, ckpt_every=100, log_every=10)
    out = Path(args.out)
    settings = {ff: c.to_dict() for ff, c in configs.items()}
    _prepare_out(out, settings, args.overwrite)

    results, histories, tree_layers = {}, {}, {}
    try:
        for ff, cfg in configs.items():
            sub = out / ff
            resume = (sub / "config.json").exists()
            if not args.json:
                print(f"training {ff} -> {sub}" + (" (resuming)" if resume else ""))
            metrics = train(cfg, sub, resume=resume, progress=not (args.no_progress or args.json))
            data = prepare_tokens(text_source(cfg.data), cfg.bpe_vocab_size, cfg.tokenizer, cfg.cache_dir)
            model = AutoModelForCausalLM.from_pretrained(sub / "final", trust_remote_code=False)  # our own classes
            ev = evaluate_lm(model, data.splits["val"], cfg.seq_len, batch_size=16, max_windows=args.val_windows)
            layers = ev.layers
            results[ff] = {**metrics, "val_loss": ev.loss, "val_ppl": ev.perplexity,
                           "ff_active_fraction": ev.ff_active_fraction, "ff_flops_per_token": ev.ff_flops_per_token,
                           "val_tokens": ev.tokens}
            if layers:
                for key in ("dead_fraction", "path_entropy"):
                    results[ff][key] = sum(l[key] for l in layers.values()) / len(layers)
                tree_layers = layers
            histories[ff] = read_jsonl(sub / "metrics.jsonl")
    except (RunDirError, CheckpointError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None

    v = verdict(results["dense"], results["tree"], max_gap=args.max_gap)
    tree_cfg = configs["tree"]
    arch = tree_cfg.model_config(tree_cfg.bpe_vocab_size)
    flat = {"data": tree_cfg.data, "preset": tree_cfg.preset, "d_model": arch.hidden_size,
            "layers": arch.num_hidden_layers, "dense FF width": arch.intermediate_size, "tree": f"depth {tree_cfg.depth}, {tree_cfg.trees} trees, "
            f"{tree_cfg.activation} per {tree_cfg.act_position}", "steps": tree_cfg.max_steps,
            "batch x seq": f"{tree_cfg.batch_size} x {tree_cfg.seq_len}", "lr": tree_cfg.lr,
            "warmup steps": tree_cfg.warmup_steps, "weight decay": tree_cfg.weight_decay,
            "FF lr x (dense / tree)": f"{configs['dense'].ff_lr_scale} / {tree_cfg.ff_lr_scale}",
            "FF weight decay": tree_cfg.weight_decay if tree_cfg.ff_weight_decay is None else tree_cfg.ff_weight_decay,
            "tree w_out init": tree_cfg.tree_out_init, "seed": tree_cfg.seed,
            "tree training backend": tree_cfg.backend, "threads": args.threads,
            "val_tokens": results["tree"]["val_tokens"]}
    command = "dynsparse " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else "dynsparse compare"
    report = write_report(out, results, flat, v, histories, read_jsonl(out / "tree" / "telemetry.jsonl"),
                          tree_layers, command)
    summary = {"results": {k: {m: r.get(m) for m in ("val_loss", "val_ppl", "ff_active_fraction", "ff_flops_per_token",
                                                      "tokens_per_s", "dead_fraction", "path_entropy", "params",
                                                      "train_seconds")} for k, r in results.items()},
               "verdict": v, "report": str(report)}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(results, tree_cfg.data)
        print(verdict_line(v))
        print(f"report: {report}")
    return 0


def _prepare_out(out: Path, settings: dict, overwrite: bool) -> None:
    from ..outputs import prepare_output

    prepare_output(out, "compare", overwrite, inputs=[s["data"] for s in settings.values()], reuse_own=True)
    marker = out / "compare.json"
    if out.exists() and any(out.iterdir()):
        same = marker.exists() and json.loads(marker.read_text()) == settings
        if same and not overwrite:
            return  # continue / reuse the same comparison
        if not marker.exists():
            raise CLIError(f"{out} exists and is not a dynsparse compare directory; choose another --out")
        if not overwrite:
            raise CLIError(f"{out} holds a comparison with different settings: pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(marker)
