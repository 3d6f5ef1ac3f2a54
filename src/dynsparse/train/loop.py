"""The training loop, as a flat story: run dir, data, model, optimizer, loop, checkpoints, final model.

Batches are a function of (seed, step), so the data position of a run is its step: resuming restores
weights, optimizer, RNG and step, and the losses continue exactly as an uninterrupted run's would.
Under torchrun every process draws the same global batch and trains on its slice of it.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..atomic import recover
from ..data import eval_windows, prepare_tokens, sample_windows, text_source
from ..lm import DynSparseLMForCausalLM
from ..mlps import find_mlps
from ..sparse_ff import ff_usage
from ..tree import TreeFF
from . import distributed, telemetry
from .balance import RoutingBalancer
from ..outputs import LOCK_NAME, RunLock, live_holder
from .checkpoint import (_STEP_DIR, CheckpointError, check_model_state, load_latest_checkpoint,
                         save_checkpoint, set_rng_state)
from .config import TrainConfig, diff_configs
from .progress import Progress
from .tensorboard_log import TensorBoardLog


class RunDirError(ValueError):
    """The output directory cannot be used as asked (holds another run, nothing to resume, ...)."""


def prepare_run_dir(run: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> RunLock:
    """Refuse to mix runs: an existing run continues only with ``resume`` and a compatible config,
    and is replaced only with ``overwrite``; a run a live process holds is never touched.

    Returns the run's lock, to hold until the run ends. Under it, what a killed run left half-written is
    recovered or removed. config.json is written later, once data and model are built, so a start that
    fails leaves nothing that a corrected rerun would take for another run."""
    config_path = run / "config.json"
    if resume and overwrite:
        raise RunDirError("choose one of --resume and --overwrite")
    if run.exists() and not run.is_dir():
        raise RunDirError(f"--out {run} is a file, not a run directory")
    pid = live_holder(run)
    if pid is not None:
        raise RunDirError(f"{run} is in use by a running dynsparse process (pid {pid}): wait for it to finish "
                          "or stop it first (two processes on one run would corrupt it)")
    contents = [p for p in run.iterdir() if p.name != LOCK_NAME] if run.exists() else []
    if resume:
        if not config_path.exists():
            raise RunDirError(f"nothing to resume in {run}: no config.json")
        try:
            saved = json.loads(config_path.read_text())
        except (ValueError, OSError):
            raise RunDirError(f"cannot resume {run}: its config.json is not valid JSON") from None
        diff = diff_configs(saved, cfg.to_dict()) if isinstance(saved, dict) else ["(not a mapping)"]
        if diff:
            raise RunDirError(f"cannot resume {run}: its config differs in {', '.join(diff)}")
    elif contents:
        if not overwrite:
            what = "another run" if config_path.exists() else "other files"
            raise RunDirError(f"{run} holds {what}: pass --resume to continue it or --overwrite to replace it")
        if not config_path.exists() and not (run / "checkpoints").exists():
            raise RunDirError(f"refusing to overwrite {run}: it does not look like a run directory")
    lock = RunLock(run).acquire()
    try:
        notes = [lock.stale_note()] if lock.stale else []
        if overwrite and not resume:
            for p in run.iterdir():
                if p.name != LOCK_NAME:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            notes += recover(run, lambda name: name == "final")
            notes += recover(run / "checkpoints", lambda name: bool(_STEP_DIR.match(name)))
            for name in ("config.tmp", "metrics.tmp", "telemetry.tmp"):  # TrainConfig.save, truncate_jsonl
                if (run / name).is_file():
                    (run / name).unlink()
                    notes.append(f"removed the temporary {run / name}")
        for line in notes:
            print(f"dynsparse: {line}", file=sys.stderr)
    except BaseException:
        lock.release()
        raise
    return lock


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    if cfg.init_from:
        from ..lm.convert import load_model  # a saved dynsparse LM, or a converted HF model

        model = load_model(cfg.init_from)
        if model.get_input_embeddings().num_embeddings < vocab_size:
            raise ValueError(f"--init-from model's vocabulary is smaller than the tokenizer's ({vocab_size})")
        return model
    return DynSparseLMForCausalLM(cfg.model_config(vocab_size))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices (and tree weight tables) decay, biases and norms do not (nanoGPT's split).

    With ``ff_lr_scale != 1`` or an ``ff_weight_decay``, the FF blocks' weights (dense fc1/fc2, tree
    w_in/w_out) and their biases get groups of their own whose ``lr_scale`` the loop applies to the
    scheduled learning rate; otherwise the two plain groups, so older checkpoints still resume."""
    split = cfg.ff_lr_scale != 1.0 or cfg.ff_weight_decay is not None
    weights, biases = _ff_parameters(model) if split else ([], [])
    own = {id(p) for p in weights + biases}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if split:
        ff_wd = cfg.weight_decay if cfg.ff_weight_decay is None else cfg.ff_weight_decay
        groups += [{"params": weights, "weight_decay": ff_wd, "lr_scale": cfg.ff_lr_scale},
                   {"params": biases, "weight_decay": 0.0, "lr_scale": cfg.ff_lr_scale}]
    # The fused kernel is several times faster than foreach on CPU; FSDP2's sharded DTensors keep foreach.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), fused=not cfg.fsdp)


def _ff_parameters(model: torch.nn.Module) -> tuple[list, list]:
    """(weights, biases) of every FF block that trains: tree w_in/w_out and b_in, and the linear layers of
    every MLP block ``find_mlps`` finds (dense fc1/fc2, GPT-2 c_fc/c_proj, Llama gate/up/down)."""
    weights, biases = [], []
    for module in model.modules():
        if isinstance(module, TreeFF):
            weights += [module.w_in, module.w_out]
            biases += [module.b_in] if module.b_in is not None else []
    for block in find_mlps(model).values():
        for layer in (block.fc1, block.fc2, block.gate_proj):
            if layer is not None:
                weights.append(layer.weight)
                biases += [layer.bias] if layer.bias is not None else []
    return _unique(weights), _unique(biases)


def _unique(params: list) -> list:
    seen, out = set(), []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def freeze_all_but_ff(model: torch.nn.Module) -> None:
    """Only the FF blocks keep ``requires_grad`` (``--trainable ff``)."""
    weights, biases = _ff_parameters(model)
    keep = {id(p) for p in weights + biases}
    if not keep:
        raise ValueError("--trainable ff: the model has no FF blocks (trees or MLPs) to train")
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def lm_loss(model, x, y) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


@torch.no_grad()
def evaluate(model, tokens, seq_len: int, batch: int, max_windows: int | None, device) -> float:
    """Mean next-token loss over consecutive windows of a split."""
    return evaluate_rows(model, *eval_windows(tokens, seq_len, max_windows), batch, device)


@torch.no_grad()
def evaluate_rows(model, x, y, batch: int, device) -> float:
    """Mean loss over the targets of (x, y) rows that are not -100 (routing counters paused)."""
    was_training = model.training
    model.eval()
    telemetry_state = {n: l.tracking for n, l in telemetry.tree_layers(model).items()}
    telemetry.set_tracking(model, False)
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        n = int((yb != -100).sum())
        if n:
            total += lm_loss(model, xb, yb).item() * n
            count += n
    for name, layer in telemetry.tree_layers(model).items():
        layer.track_usage(telemetry_state[name])
    model.train(was_training)
    return total / max(count, 1)


def ff_summary(model: torch.nn.Module) -> dict:
    """FF active fraction and FLOPs/token (per block, averaged over blocks): the nominal cost of the
    model's FF blocks (training logs it beside the loss; measured costs come from evaluation)."""
    return ff_usage(distributed.unwrap(model), measured=False)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          tensorboard: bool = True, on_snapshot: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """Run (or continue) a training run in ``out``; returns the final metrics (also in final/metrics.json).
    With ``tensorboard`` (and the package installed) the logged scalars also go to ``<run>/tensorboard/``.
    ``on_snapshot(step, model)`` is called (main process) before the first step of a fresh run and at every
    telemetry snapshot, e.g. to measure the model on fixed held-out tokens.
    The run's lock is held from the first check to the end, so no second process can use the run."""
    d = distributed.setup()
    run = Path(out)
    lock = prepare_run_dir(run, cfg, resume, overwrite) if d.main else None
    d.barrier()
    try:
        return _train(cfg, run, d, resume, progress, on_step, tensorboard, on_snapshot)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, run: Path, d, resume: bool, progress: bool, on_step, tensorboard: bool,
           on_snapshot=None) -> dict:
    if cfg.init_from:  # checked before any tokenizing
        from ..remote_code import check_remote_code

        if not (Path(cfg.init_from) / "config.json").is_file():
            raise FileNotFoundError(f"--init-from {cfg.init_from} is not a saved model directory (no config.json)")
        check_remote_code(cfg.init_from, False, how="dynsparse train never runs it (train a model whose "
                          "classes transformers or dynsparse ship)")
    # ---- data (rank 0 tokenizes into the cache first; the others then read it)
    tokenizer_dir = cfg.tokenizer
    if tokenizer_dir is None and cfg.init_from:  # continue with the pretrained model's own tokenizer
        from ..lm.convert import load_tokenizer_if_any

        tokenizer_dir = cfg.init_from if load_tokenizer_if_any(cfg.init_from) is not None else None
    if cfg.qa:  # question-answering fine-tuning: rows with the loss on the answers only
        if tokenizer_dir is None:
            raise ValueError("QA fine-tuning needs the pretrained model's tokenizer: --init-from DIR or --tokenizer DIR")
        from ..data import load_tokenizer
        from ..data.qa import QAData

        tokenizer = load_tokenizer(tokenizer_dir)
        qa = QAData(cfg.qa, tokenizer, cfg.seq_len)
        vocab_size = len(tokenizer)
        train_batch = lambda step: qa.sample(cfg.batch_size, cfg.seed, step)  # noqa: E731
    else:
        source = text_source(cfg.data)
        if d.main:
            data = prepare_tokens(source, cfg.bpe_vocab_size, tokenizer_dir, cfg.cache_dir)
        d.barrier()
        if not d.main:
            data = prepare_tokens(source, cfg.bpe_vocab_size, tokenizer_dir, cfg.cache_dir)
        data.check_length(cfg.seq_len)
        tokenizer, vocab_size = data.tokenizer, data.vocab_size
        train_batch = lambda step: sample_windows(data.splits["train"], cfg.batch_size, cfg.seq_len, cfg.seed, step)  # noqa: E731

    # ---- model and optimizer
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab_size).to(d.device)
    if cfg.trainable == "ff":
        freeze_all_but_ff(model)
    if model.config.max_position_embeddings < cfg.seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context ({model.config.max_position_embeddings})")
    for layer in telemetry.tree_layers(model).values():
        layer.backend = cfg.backend
    telemetry.set_tracking(model, cfg.telemetry)
    model = distributed.wrap(model, d, cfg.fsdp)
    optimizer = make_optimizer(model, cfg)

    start, tokens_seen, resumed = 0, 0, {}
    if resume:
        reference = _plain_copy(cfg, vocab_size) if cfg.fsdp and not cfg.init_from else distributed.unwrap(model)

        def restore(ck, path):
            check_model_state(reference, ck["model"], str(path))
            try:
                distributed.load_full_state(model, optimizer, ck["model"], ck["optimizer"])
            except (ValueError, KeyError, IndexError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit this model "
                                      f"({type(e).__name__})") from None

        note = (lambda line: print(f"dynsparse: {line}", file=sys.stderr)) if d.main else None
        ck = load_latest_checkpoint(run, restore, move=d.main, note=note)
        if ck is not None:
            set_rng_state(ck["rng"])
            resumed = ck["state"]
            start, tokens_seen = resumed["step"], resumed["tokens"]
    if d.main and not (run / "config.json").exists():
        cfg.save(run / "config.json")  # data and model are built: from here on this folder is a run
    if d.main:
        for name in ("metrics.jsonl", "telemetry.jsonl"):
            telemetry.truncate_jsonl(run / name, start)
    if start >= cfg.max_steps and (run / "final").exists():
        return json.loads((run / "final" / "metrics.json").read_text())
    if start > cfg.max_steps:
        raise RunDirError(f"cannot resume {run} with --max-steps {cfg.max_steps}: its last checkpoint is at step "
                          f"{start}; pass --max-steps {start} or more")

    balancer = RoutingBalancer(model, cfg.tree_balance_rate) if cfg.tree_balance_rate > 0 else None

    # ---- the loop
    per_rank = cfg.batch_size // d.world
    if per_rank * d.world != cfg.batch_size or per_rank % cfg.grad_accum:
        raise ValueError(f"batch_size {cfg.batch_size} must split evenly over {d.world} process(es) "
                         f"x {cfg.grad_accum} micro-batches")
    micro = per_rank // cfg.grad_accum
    amp = torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()
    eval_bs = max(1, per_rank)
    eval_windows_n = cfg.eval_batches * eval_bs
    train_time, telemetry_time = 0.0, 0.0
    last_loss, val_loss = float(resumed.get("loss", float("nan"))), resumed.get("val_loss")
    if start == cfg.max_steps:  # killed while saving the final model: finish it from the last checkpoint
        if val_loss is None:  # a checkpoint written before the state kept the losses
            val_loss = (evaluate_rows(model, *qa.splits["val"], eval_bs, d.device) if cfg.qa else
                        evaluate(model, data.splits["val"], cfg.seq_len, eval_bs, eval_windows_n, d.device))
        if not math.isfinite(last_loss):
            logged = [r for r in telemetry.read_jsonl(run / "metrics.jsonl") if r.get("step") == start]
            last_loss = float(logged[-1]["loss"]) if logged else last_loss
    ff = ff_summary(model)
    bar = Progress(cfg.max_steps, start, enabled=progress and d.main, ff_active=ff.get("ff_active_fraction"))
    tb = TensorBoardLog(run, tensorboard and d.main, start if resume else None, ff)
    if on_snapshot is not None and d.main and start == 0 and cfg.max_steps > 0:
        on_snapshot(0, distributed.unwrap(model))
    model.train()
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        x, y = train_batch(step)
        x, y = x[d.rank * per_rank : (d.rank + 1) * per_rank], y[d.rank * per_rank : (d.rank + 1) * per_rank]
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            xb, yb = x[m * micro : (m + 1) * micro].to(d.device), y[m * micro : (m + 1) * micro].to(d.device)
            sync = m == cfg.grad_accum - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()), amp:
                loss = lm_loss(model, xb, yb) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if balancer is not None:
            balancer.step()
        done = step + 1
        tokens_seen += cfg.batch_size * cfg.seq_len
        train_time += time.perf_counter() - t0
        last_loss = d.mean(loss_sum)
        if not math.isfinite(last_loss):
            raise FloatingPointError(f"training loss became {last_loss} at step {done}; lower --lr")
        if on_step is not None:
            on_step(done, last_loss)

        if cfg.telemetry and telemetry.tree_layers(model) and done % cfg.telemetry_every == 0:
            t1 = time.perf_counter()
            record = telemetry.snapshot(model, done)
            if balancer is not None:
                balancer.rebase()  # the snapshot reset the routing counters
            if d.main:
                telemetry.append_jsonl(run / "telemetry.jsonl", record)
                tb.telemetry(record)
                if on_snapshot is not None:
                    on_snapshot(done, distributed.unwrap(model))
            telemetry_time += time.perf_counter() - t1
        record = {"step": done, "loss": round(last_loss, 5), "lr": lr, "tokens": tokens_seen,
                  "tokens_per_s": round(tokens_seen_rate(cfg, done - start, train_time), 1)}
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            if cfg.qa:
                val_loss = evaluate_rows(model, *qa.splits["val"], eval_bs, d.device)
            else:
                val_loss = evaluate(model, data.splits["val"], cfg.seq_len, eval_bs, eval_windows_n, d.device)
            record.update(val_loss=round(val_loss, 5), val_ppl=round(math.exp(val_loss), 3))
        if d.main and (done % cfg.log_every == 0 or "val_loss" in record or done == cfg.max_steps):
            telemetry.append_jsonl(run / "metrics.jsonl", record)
            tb.metrics(record)
        bar.update(done, last_loss, record["tokens_per_s"], val_loss)
        if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
            model_sd, optim_sd = distributed.full_state(model, optimizer)
            if d.main:
                save_checkpoint(run, done, model_sd, optim_sd, {"tokens": tokens_seen, "loss": last_loss,
                                "val_loss": val_loss, "tokens_per_s": record["tokens_per_s"]}, cfg.keep_checkpoints)
            d.barrier()
    bar.close()
    tb.close()

    # ---- final model: an HF directory that from_pretrained loads
    metrics = {"steps": cfg.max_steps, "tokens": tokens_seen, "train_loss": last_loss,
               "val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss is not None else None,
               "tokens_per_s": (tokens_seen_rate(cfg, cfg.max_steps - start, train_time) if cfg.max_steps > start
                                else resumed.get("tokens_per_s", 0.0)),
               "train_seconds": train_time, "telemetry_seconds": telemetry_time,
               "params": sum(p.numel() for p in distributed.unwrap(model).parameters()),
               "trainable_params": sum(p.numel() for p in distributed.unwrap(model).parameters() if p.requires_grad),
               "world_size": d.world, **ff_summary(model)}
    metrics.update({f"tree_{k}": v for k, v in telemetry.summarize(telemetry.read_jsonl(run / "telemetry.jsonl")).items()})
    model_sd, _ = distributed.full_state(model, optimizer)
    if d.main:
        save_final(distributed.unwrap(model), model_sd, tokenizer, run / "final", metrics)
    d.barrier()
    return metrics


def tokens_seen_rate(cfg: TrainConfig, steps: int, seconds: float) -> float:
    return steps * cfg.batch_size * cfg.seq_len / seconds if seconds > 0 else 0.0


def save_final(model, state_dict: dict, tokenizer, path: Path, metrics: dict) -> None:
    """save_pretrained + tokenizer + metrics into a temporary dir, then renamed to ``path``."""
    from ..lm.convert import save_converted

    for layer in telemetry.tree_layers(model).values():
        layer.backend = "auto"  # the saved model picks its backend itself
    save_converted(model, path, tokenizer, state_dict, extra={"metrics.json": json.dumps(metrics, indent=1)})


def _plain_copy(cfg, vocab_size):
    """A plain (unsharded) model of the run's shape, to validate a checkpoint's keys and shapes."""
    with torch.device("meta"):
        return DynSparseLMForCausalLM(cfg.model_config(vocab_size))


__all__ = ["train", "TrainConfig", "RunDirError", "CheckpointError", "lr_at", "evaluate"]
