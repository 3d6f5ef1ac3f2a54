"""``dynsparse bench``: time conditional execution against dense baselines and print the ratios."""
from __future__ import annotations

import json

import torch

from ..cli import CLIError

SUITE_NAMES = ("tree", "train", "mgs", "lm")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark tree / gated kernels against dense MLPs (same process, dtype and threads)",
        description="Warm up, take the median of repeated runs, print baseline time, dynsparse time, ratio, "
        "achieved GFLOP/s and GB/s, next to this machine's matmul GFLOP/s and memory bandwidth.",
    )
    p.add_argument("suite", nargs="?", default="all", choices=SUITE_NAMES + ("all",))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--threads", type=int, default=None, help="torch (and numba) threads; default: torch's")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per measurement (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before measuring")
    p.add_argument("--tokens", type=str, default="1,16,256,2048", help="token counts of the tree 1x11 case")
    p.add_argument("--forest-tokens", type=int, default=2048, help="tokens of the 16x7 case")
    p.add_argument("--train-tokens", type=int, default=4096, help="tokens of the forward+backward case")
    p.add_argument("--mgs-tokens", type=int, default=850, help="tokens of the MGS block case")
    p.add_argument("--mgs-d-model", type=int, default=256, help="d_model of the MGS block case")
    p.add_argument("--mgs-d-ff", type=int, default=2048, help="d_ff of the MGS block case")
    p.add_argument("--union-tokens", type=int, default=256, help="tokens of the union-vs-per-token cases")
    p.add_argument("--lm-tokens", type=int, default=128, help="tokens the LM generates")
    p.add_argument("--lm-preset", default="small", help="dynsparse.lm preset of the generation case")
    p.add_argument("--peak-matmul-n", type=int, default=1536, help="GEMM size of the matmul-peak measurement")
    p.add_argument("--peak-megabytes", type=int, default=256, help="buffer of the bandwidth measurement")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-ff", type=int, default=3072, help="width of the dense baseline MLP")
    p.set_defaults(func=run)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise CLIError(f"--{name} must be >= 1, got {value}")
    return value


def run(args) -> int:
    from ..bench import Settings, run_suites  # heavy imports only when benchmarking

    try:
        tokens = tuple(_positive("tokens", int(t)) for t in args.tokens.split(",") if t.strip())
    except ValueError:
        raise CLIError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    if not tokens:
        raise CLIError("--tokens must name at least one token count")
    for name in ("repeats", "forest_tokens", "train_tokens", "mgs_tokens", "mgs_d_model", "mgs_d_ff", "union_tokens",
                 "lm_tokens", "d_model", "d_ff", "peak_matmul_n", "peak_megabytes"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None:
        torch.set_num_threads(_positive("threads", args.threads))
    settings = Settings(
        warmup=args.warmup, repeats=args.repeats, d_model=args.d_model, d_ff=args.d_ff, tree_tokens=tokens,
        forest_tokens=args.forest_tokens, train_tokens=args.train_tokens, mgs_tokens=args.mgs_tokens,
        mgs_d_model=args.mgs_d_model, mgs_d_ff=args.mgs_d_ff, union_tokens=args.union_tokens, lm_new_tokens=args.lm_tokens, lm_preset=args.lm_preset,
        peak_matmul_n=args.peak_matmul_n, peak_megabytes=args.peak_megabytes,
    )
    if args.mgs_d_ff % 16:
        raise CLIError(f"--mgs-d-ff must be a multiple of 16 (the gate's group size), got {args.mgs_d_ff}")
    if args.d_ff % 16:
        raise CLIError(f"--d-ff must be a multiple of 16 (the gate's group size), got {args.d_ff}")
    names = list(SUITE_NAMES) if args.suite == "all" else [args.suite]
    from ..lm import PRESETS

    if args.lm_preset not in PRESETS:  # checked for every suite: a typo is named even where it is unused
        raise CLIError(f"--lm-preset must be one of {sorted(PRESETS)}, got {args.lm_preset!r}")
    if args.json:
        report = run_suites(names, settings)
        print(json.dumps(report, indent=2))
    else:
        from ..bench.report import Printer

        printer = Printer()
        report = run_suites(names, settings, on_result=printer.row)
        printer.finish(report)
    return 1 if report["errors"] and len(report["errors"]) == len(names) else 0
