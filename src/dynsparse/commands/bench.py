"""``dynsparse bench``: time conditional execution against dense baselines and print the ratios."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..cli import CLIError

SUITE_NAMES = ("tree", "train", "mgs", "lm")
GENERATE_ONLY = {"--model": "model", "--sparsify": "sparsify", "--converted": "converted", "--dtype": "dtype", "--prefill": "prefill",
                 "--no-compile": "no_compile", "--no-hf": "no_hf", "--copy-megabytes": "copy_megabytes",
                 "--linears": "linears"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark tree / gated kernels against dense MLPs (same process, dtype and threads)",
        description="Warm up, take the median of repeated runs, print baseline time, dynsparse time, ratio, "
        "achieved GFLOP/s and GB/s, next to this machine's matmul GFLOP/s and memory bandwidth.",
    )
    p.add_argument("suite", nargs="?", default="all", choices=SUITE_NAMES + ("all", "generate"),
                   help="a kernel suite, all of them, or generate: batch-1 decoding of a real LM (--model)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--threads", type=int, default=None, help="torch (and numba) threads; default: torch's")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per measurement (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before measuring")
    p.add_argument("--tokens", type=str, default=None,
                   help="token counts of the tree 1x11 case (default 1,16,256,2048); generate: tokens to decode (default 64)")
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
    g = p.add_argument_group("generate")
    g.add_argument("--model", default=None, help="generate: an HF model dir, a .gguf file, a hub id or a built-in name "
                   "(smollm2-135m)")
    g.add_argument("--sparsify", action="append", default=[], metavar="DIR",
                   help="generate: a sparsified directory (dynsparse sparsify --out) to decode too; repeatable")
    g.add_argument("--converted", action="append", default=[], metavar="DIR",
                   help="generate: --model with its MLPs replaced (dynsparse convert or train output, same tokenizer) "
                   "to decode too; repeatable")
    g.add_argument("--dtype", default=None, help="generate: fp32, bf16 or both, comma-separated (default fp32,bf16)")
    g.add_argument("--prefill", default=None, help="generate: prompt lengths of the prefill timings (default 128,512)")
    g.add_argument("--no-compile", action="store_true", help="generate: run the fast path eagerly (no torch.compile)")
    g.add_argument("--no-hf", action="store_true", help="generate: skip the HF generate reference rows")
    g.add_argument("--linears", choices=["gemv", "torch"], default=None,
                   help="generate: the fast loop's linear layers for every variant (default gemv: dynsparse::gemv; "
                   "the dense model is also timed on torch's F.linear unless this is torch)")
    g.add_argument("--copy-megabytes", type=int, default=None,
                   help="generate: buffer of the bandwidth measurement (default 1024, far beyond the caches)")
    p.set_defaults(func=run)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise CLIError(f"--{name} must be >= 1, got {value}")
    return value


def run(args) -> int:
    if args.suite == "generate":
        return _run_generate(args)
    from ..bench import Settings, run_suites  # heavy imports only when benchmarking

    given = [flag for flag, dest in GENERATE_ONLY.items() if getattr(args, dest) not in (None, [], False)]
    if given:
        raise CLIError(f"{given[0]} applies to bench generate only")
    if args.tokens is None:
        args.tokens = "1,16,256,2048"
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


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CLIError(f"--{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise CLIError(f"--{flag} must name token counts >= 2, got {text!r}")
    return values


def _run_generate(args) -> int:
    from ..bench.generate import GenerateSettings, print_table, run_generate
    from ..decode import DTYPES
    from ..lm.pretrained import resolve_model

    if not args.model:
        raise CLIError("bench generate needs --model (a model directory, a .gguf file, a hub id or smollm2-135m)")
    args.dtype = "fp32,bf16" if args.dtype is None else args.dtype
    dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise CLIError(f"--dtype must be fp32, bf16 or fp32,bf16, got {args.dtype!r}")
    new_tokens = _int_list("tokens", "64" if args.tokens is None else args.tokens)
    if len(new_tokens) != 1:
        raise CLIError(f"--tokens of bench generate is one count of tokens to decode, got {args.tokens!r}")
    prefill = _int_list("prefill", "128,512" if args.prefill is None else args.prefill)
    for d in args.sparsify:
        if not (Path(d) / "gates.safetensors").is_file():
            raise CLIError(f"--sparsify {d}: not a sparsified directory (no gates.safetensors)")
    for d in args.converted:
        if not (Path(d) / "config.json").is_file():
            raise CLIError(f"--converted {d}: not a saved model directory (no config.json)")
    try:
        model = str(resolve_model(args.model))
    except ValueError as e:
        raise CLIError(str(e)) from None
    settings = GenerateSettings(
        model=model, sparsify=tuple(args.sparsify), converted=tuple(args.converted), dtypes=dtypes, new_tokens=new_tokens[0], prefill=prefill,
        repeats=_positive("repeats", args.repeats), compile=not args.no_compile, hf_reference=not args.no_hf,
        copy_megabytes=_positive("copy-megabytes", args.copy_megabytes or 1024), threads=args.threads or 2,
        linears=args.linears or "gemv",
    )
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    try:
        report = run_generate(settings, log=log)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0
