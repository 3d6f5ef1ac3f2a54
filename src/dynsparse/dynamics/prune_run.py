"""Static conversion of a trained tree LM: count routing on calibration text, prune every tree, save.

Calibration is the run's training split (the paths the model was trained on); the held-out change is
measured on the validation split. On the calibration windows the pruned model computes the same
function (every path it took there is kept), which the report checks.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..data import eval_windows, prepare_tokens, text_source
from ..lm import DynSparseLMForCausalLM
from ..lm.quiet import hf_bars_off
from ..lm.remote import write_remote_code
from ..train.config import TrainConfig
from ..train.loop import lm_loss
from ..tree import TreeFF, prune_static
from .pruned_lm import PrunedDynSparseLMConfig, PrunedDynSparseLMForCausalLM


class PruneRunError(ValueError):
    """The run cannot be pruned as asked."""


@dataclass
class PruneResult:
    layers: int
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    calib_tokens: int
    calib_loss_before: float
    calib_loss_after: float
    val_loss_before: float
    val_loss_after: float

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict:
        ppl = {k.replace("_loss_", "_ppl_"): math.exp(v) for k, v in asdict(self).items() if "_loss_" in k}
        return {**asdict(self), **ppl, "params_removed": self.params_removed}


@torch.no_grad()
def _loss(model, windows, batch: int = 16) -> float:
    x, y = windows
    total = 0.0
    for i in range(0, len(x), batch):
        total += lm_loss(model, x[i : i + batch], y[i : i + batch]).item() * y[i : i + batch].numel()
    return total / y.numel()


def prune_run(run: str | Path, out: str | Path, calib_windows: int = 64, val_windows: int = 32,
              min_visits: int = 1, overwrite: bool = False) -> PruneResult:
    run, out = Path(run), Path(out)
    final = run / "final"
    if not (final / "config.json").exists() or not (run / "config.json").exists():
        raise PruneRunError(f"{run} is not a finished `dynsparse train` run (no final/ model or config.json)")
    from ..outputs import prepare_output

    prepare_output(out, "prune", overwrite, inputs=[run])  # never the run itself, nor a folder holding it
    if calib_windows < 1 or val_windows < 1 or min_visits < 1:
        raise PruneRunError("--calib-windows, --val-windows and --min-visits must be >= 1")
    kind = json.loads((final / "config.json").read_text()).get("model_type")
    if kind != DynSparseLMForCausalLM.config_class.model_type:  # loading it as one would drop its weights
        raise PruneRunError(f"{final} is a {kind!r} model: prune handles the LMs dynsparse trains from scratch "
                            "(model type 'dynsparse_lm'), not converted or already pruned models")
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    model = DynSparseLMForCausalLM.from_pretrained(str(final)).eval()
    trees = {n: m for n, m in model.named_modules() if isinstance(m, TreeFF)}
    if not trees:
        raise PruneRunError(f"{final} has no tree layers (a dense model): nothing to prune")

    data = prepare_tokens(text_source(cfg.data), cfg.bpe_vocab_size, cfg.tokenizer, cfg.cache_dir)
    calib = eval_windows(data.splits["train"], cfg.seq_len, calib_windows)
    val = eval_windows(data.splits["val"], cfg.seq_len, val_windows)
    for layer in trees.values():
        layer.backend = "torch"  # one execution path for counting and comparing
        layer.reset_usage()
        layer.track_usage(True)
    calib_before = _loss(model, calib)
    for layer in trees.values():
        layer.track_usage(False)
    val_before = _loss(model, val)

    specs, nodes_before, nodes_after = {}, 0, 0
    params_before = sum(p.numel() for p in model.parameters())
    for name, layer in trees.items():
        pruned = prune_static(layer, min_visits=min_visits)
        nodes_before += pruned.prune_report.nodes_before
        nodes_after += pruned.prune_report.nodes_after
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, pruned)
        specs[name] = pruned.shape_spec()
    params_after = sum(p.numel() for p in model.parameters())
    result = PruneResult(len(trees), nodes_before, nodes_after, params_before, params_after, calib[1].numel(),
                         calib_before, _loss(model, calib), val_before, _loss(model, val))

    tree = {**model.config.tree, "whiten": False}  # prune_static folded any whitening into the pruned tables
    config = PrunedDynSparseLMConfig(**{**model.config.to_dict(), "tree": tree, "pruned_layers": specs})
    config.architectures = [PrunedDynSparseLMForCausalLM.__name__]
    pruned_model = PrunedDynSparseLMForCausalLM(config)
    pruned_model.load_state_dict(model.state_dict())
    _save(pruned_model, data.tokenizer, out, result)
    return result


def _save(model, tokenizer, out: Path, result: PruneResult) -> None:
    with atomic_dir(out) as tmp, hf_bars_off():
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "prune_report.json").write_text(json.dumps(result.to_dict(), indent=1))
        write_remote_code(tmp)  # stock tools load it with trust_remote_code=True
