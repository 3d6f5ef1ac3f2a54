"""``dynsparse train``: train a dense or tree-FF language model (single process, or DDP/FSDP2 under torchrun)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import CLIError
from ..ops.backend import BACKENDS


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by train and compare; each overrides the preset (None = keep the preset's)."""
    from ..lm import PRESETS

    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture + training defaults")
    p.add_argument("--config", dest="yaml_file", metavar="FILE.yaml", help="options as a YAML mapping")
    p.add_argument("--depth", type=int, help="tree depth (active fraction (depth+1)/(2^(depth+1)-1))")
    p.add_argument("--trees", type=int, help="number of trees per FF block")
    p.add_argument("--activation", choices=["gelu", "relu", "silu", "tanh", "identity"])
    p.add_argument("--act-position", choices=["node", "path"])
    p.add_argument("--whiten", action="store_true", default=None,
                   help="whiten each tree's input with the previous batch's mean and covariance while training "
                   "(keeps early training from starving most nodes; folded into the weights by dynsparse prune)")
    p.add_argument("--tree-out-init", choices=["published", "residual"],
                   help="tree w_out init: the published uniform, or N(0, 0.02/sqrt(2 layers)) like dense fc2")
    p.add_argument("--position-embedding", choices=["learned", "rope"])
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--data", help="'shakespeare' (built in), a .txt/.jsonl file or a folder of them, or a Hugging Face "
                   "dataset hf:NAME[:CONFIG][#COLUMN] (Hub name when online, or a local dataset folder; "
                   "column 'text' by default)")
    p.add_argument("--vocab-size", type=int, help="size of the byte-level BPE trained on the data")
    p.add_argument("--tokenizer", help="a local HF tokenizer directory to use instead of training a BPE")
    p.add_argument("--cache-dir", help="where tokenized corpora are cached (default ~/.cache/dynsparse)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (sequences per optimizer step)")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--ff-lr-scale", type=float, help="learning-rate multiplier for the FF block's weights (dense fc1/fc2 or tree tables)")
    p.add_argument("--tree-balance-rate", type=float,
                   help="after each step move node biases by this against their left/right imbalance (0: off)")
    p.add_argument("--ff-weight-decay", type=float, help="weight decay of the FF weight matrices/tables (default: --weight-decay)")
    p.add_argument("--trainable", choices=["all", "ff"],
                   help="what trains: everything (default), or only the FF blocks (trees or dense MLPs), with "
                   "attention, embeddings and norms frozen")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 = bfloat16 autocast")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", choices=list(BACKENDS), help="backend of the tree ops while training (auto: numba on CPU, triton on CUDA)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--telemetry-every", type=int, help="steps between routing snapshots (telemetry.jsonl)")


MODEL_FLAGS = ("depth", "trees", "activation", "act_position", "whiten", "tree_out_init", "position_embedding", "d_model", "n_layer",
               "n_head", "data", "vocab_size", "tokenizer", "cache_dir", "seq_len", "batch_size", "grad_accum",
               "max_steps", "lr", "warmup_steps", "weight_decay", "ff_lr_scale", "ff_weight_decay", "tree_balance_rate", "trainable", "grad_clip", "dtype", "seed", "backend",
               "eval_every", "eval_batches", "telemetry_every")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a language model with dense or tree FF blocks",
                              description=__doc__)
    add_model_flags(p)
    p.add_argument("--ff", choices=["dense", "tree"], help="feed-forward block (default: dense)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--init-from", help="a model to continue training: an HF model directory (e.g. dynsparse convert "
                   "output), a .gguf file, a hub id or a built-in name (smollm2-135m)")
    p.add_argument("--qa", metavar="FILE.jsonl",
                   help="fine-tune on question answering (records: context, question, answer; loss on answers)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (the last 2 are kept)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--no-telemetry", action="store_true", help="do not count routing (to measure its overhead)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) under torchrun")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="do not write <out>/tensorboard/ (written by default when tensorboard is installed)")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    p.set_defaults(func=run)


def config_from_args(args, **extra):
    from ..train import TrainConfig

    flags = {k: getattr(args, k, None) for k in MODEL_FLAGS}
    flags.update(extra)
    if flags.get("telemetry_every") == 0:
        raise CLIError("--telemetry-every must be a positive number of steps (use --no-telemetry to turn it off)")
    try:
        return TrainConfig.build(args.preset, args.yaml_file, **flags)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise CLIError(str(e)) from None


NEW_MODEL_FLAGS = ("depth", "trees", "activation", "act_position", "whiten", "tree_out_init", "position_embedding",
                   "d_model", "n_layer", "n_head")


def _check_init_flags(args, name: str) -> None:
    """--init-from keeps the loaded model's blocks and shape: a flag that would shape a new one is an error,
    and --ff must name the kind of block the model has (trees come from dynsparse convert), not be ignored."""
    from ..lm.convert import MARKER

    given = [f"--{k.replace('_', '-')}" for k in NEW_MODEL_FLAGS if getattr(args, k, None) is not None]
    if given:
        raise CLIError(f"{', '.join(given)}: only shape a new model; --init-from {name} keeps its own")
    if args.ff is None:
        return
    d = Path(args.init_from)
    try:
        own = json.loads((d / "config.json").read_text()).get("ff", "dense")
    except (OSError, ValueError, AttributeError):
        return  # the loop's own checks name what is wrong with the directory
    has = "tree" if (d / MARKER).is_file() or own == "tree" else "dense"
    if args.ff != has:
        hint = f"; make trees with dynsparse convert --model {name} --depth D --trees K --out DIR" \
            if args.ff == "tree" else ""
        raise CLIError(f"--ff {args.ff}: --init-from {name} has {has} FF blocks{hint}")


def run(args) -> int:
    from ..train import CheckpointError, RunDirError, train
    from ..train.distributed import finish_worker

    if args.init_from is not None:  # as every --model: a directory, a .gguf, a hub id or a built-in name
        from ..lm.pretrained import resolve_model

        name = args.init_from
        try:
            args.init_from = str(resolve_model(name))
        except ValueError as e:
            raise CLIError(f"--init-from: {e}") from None
        _check_init_flags(args, name)

    cfg = config_from_args(
        args, ff=args.ff, init_from=args.init_from, qa=args.qa, ckpt_every=args.ckpt_every, log_every=args.log_every,
        telemetry=False if args.no_telemetry else None, fsdp=True if args.fsdp else None,
    )
    try:
        metrics = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress and not args.json, tensorboard=not args.no_tensorboard)
    except (RunDirError, CheckpointError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"val loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.2f}), "
              f"{metrics['tokens_per_s']:,.0f} tokens/s; model in {args.out}/final")
    sys.stdout.flush()
    finish_worker(0)  # only under torchrun: clean exit of the worker
    return 0
