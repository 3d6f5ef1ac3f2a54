"""Train the built-in small DETR on the synthetic shapes set (CPU, one thread, time-boxed).

    python scripts/train_detr.py --minutes 95 --eval-minutes 6     # how the committed model was made

1. writes the synthetic COCO set (dynsparse.detection.synthetic) if --data does not exist;
2. preprocesses the train split once with the DETR image processor (images are 128 px, no resizing);
3. encoder warm-up: backbone, input projection and encoder learn a dense per-cell class + box task on the
   encoder output alone (dynsparse.detection.encoder_aux; --encoder-warmup-steps at --encoder-warmup-lr).
   Without it the DETR loss never got past its plateau here (every query predicting the mean box, the class
   loss stuck at the label prior) in three runs of up to 42 minutes;
4. trains DetrForObjectDetection (dynsparse.detection.model.small_detr_config; backbone batch norms trainable
   while training) with AdamW on the Hungarian-matched DETR loss incl. auxiliary decoder losses plus the
   dense encoder loss (--encoder-aux-weight), random horizontal flips, grad-norm clip 0.1, linear warm-up,
   lr / 10 for the last 20 % of the time budget; the dense head is dropped when saving;
5. every --eval-minutes evaluates val AP with pycocotools and checkpoints (last + best) under --workdir;
6. exports the best checkpoint in float16 safetensors + config + image-processor config to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dynsparse.detection.coco import CocoDetection, make_collate
from dynsparse.detection.encoder_aux import EncoderDenseHead
from dynsparse.detection.evaluate import evaluate_detr
from dynsparse.detection.model import (
    build_small_detr,
    freeze_batch_norm_,
    small_detr_processor,
    trainable_batch_norm_,
)
from dynsparse.detection.synthetic import make_synthetic_coco


def save_atomic(model, processor, out: Path, dtype=None, extra: dict | None = None) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m = copy.deepcopy(model).eval()
    freeze_batch_norm_(m)
    if dtype is not None:
        m = m.to(dtype)
    m.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if extra:
        (tmp / "train_info.json").write_text(json.dumps(extra, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def random_batch(pixels, labels, batch_size: int):
    """A random batch with random horizontal flips (boxes flipped with their images)."""
    idx = torch.randint(len(labels), (batch_size,))
    x = pixels[idx].clone()
    flip = torch.rand(batch_size) < 0.5
    x[flip] = x[flip].flip(-1)
    ys = []
    for k, i in enumerate(idx.tolist()):
        y = {"class_labels": labels[i]["class_labels"], "boxes": labels[i]["boxes"].clone()}
        if flip[k]:
            y["boxes"][:, 0] = 1 - y["boxes"][:, 0]
        ys.append(y)
    return x, ys


def warm_up_encoder(model, aux, pixels, labels, args) -> None:
    """Backbone, input projection and encoder learn the dense per-cell task alone first: with the DETR loss
    from the start, its box terms dominate the shared gradient and the features stay uninformative."""
    params = [*model.model.backbone.parameters(), *model.model.input_projection.parameters(),
              *model.model.encoder.parameters(), *aux.parameters()]
    opt = torch.optim.AdamW(params, lr=args.encoder_warmup_lr, weight_decay=1e-4)
    t0 = time.time()
    for step in range(1, args.encoder_warmup_steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.encoder_warmup_lr * min(1.0, step / args.warmup_steps)
        x, ys = random_batch(pixels, labels, args.batch_size)
        memory = model.model(pixel_values=x, pixel_mask=torch.ones(x.shape[0], *x.shape[2:], dtype=torch.long))
        loss = aux.loss(memory.encoder_last_hidden_state, ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"encoder warm-up step {step} {(time.time() - t0) / 60:.1f} min enc-aux {loss.item():.3f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/synth_coco")
    ap.add_argument("--workdir", default="runs/detr")
    ap.add_argument("--out", default="src/dynsparse/assets/detr")
    ap.add_argument("--minutes", type=float, default=50.0)
    ap.add_argument("--eval-minutes", type=float, default=6.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encoder-aux-weight", type=float, default=3.0,
                    help="weight of the dense per-cell class+box loss on the encoder output (0: plain DETR loss)")
    ap.add_argument("--encoder-warmup-steps", type=int, default=2000,
                    help="steps that train backbone + encoder on the dense loss alone before the DETR loss starts")
    ap.add_argument("--encoder-warmup-lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-val", type=int, default=400)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, workdir, out = Path(args.data), Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        make_synthetic_coco(data, args.n_train, args.n_val, seed=args.seed)
    train, val = CocoDetection(data, "train"), CocoDetection(data, "val")
    processor = small_detr_processor()
    collate = make_collate(processor)
    batches = [collate([train[j] for j in range(i, min(i + 64, len(train)))]) for i in range(0, len(train), 64)]
    pixels = torch.cat([b["pixel_values"] for b in batches])
    labels = [lab for b in batches for lab in b["labels"]]
    print(f"train {len(train)} images {tuple(pixels.shape)}, val {len(val)} images", flush=True)

    model = build_small_detr(train.id2label).train()
    trainable_batch_norm_(model)  # random backbone: real batch norm while training, frozen again when saved
    aux = EncoderDenseHead(model.config.d_model, len(train.id2label))
    opt = torch.optim.AdamW([*model.parameters(), *aux.parameters()], lr=args.lr, weight_decay=1e-4)
    t0, last_eval, step, best = time.time(), time.time(), 0, -1.0
    budget = args.minutes * 60
    history = []
    if args.encoder_warmup_steps and args.encoder_aux_weight:
        warm_up_encoder(model, aux, pixels, labels, args)
    while True:
        elapsed = time.time() - t0
        if elapsed > budget:
            break
        lr = args.lr if elapsed < 0.8 * budget else args.lr / 10
        lr *= min(1.0, (step + 1) / args.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x, ys = random_batch(pixels, labels, args.batch_size)
        outputs = model(pixel_values=x, pixel_mask=torch.ones(x.shape[0], *x.shape[2:], dtype=torch.long), labels=ys)
        aux_loss = aux.loss(outputs.encoder_last_hidden_state, ys) if args.encoder_aux_weight else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (outputs.loss + args.encoder_aux_weight * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *aux.parameters()], 0.1)
        opt.step()
        step += 1
        if step % 50 == 0:
            ld = outputs.loss_dict
            print(f"step {step} {elapsed / 60:.1f} min lr {lr:.0e} loss {outputs.loss.item():.3f} "
                  f"ce {ld['loss_ce'].item():.3f} l1 {ld['loss_bbox'].item():.3f} giou {ld['loss_giou'].item():.3f} "
                  f"enc-aux {aux_loss.item():.3f}",
                  flush=True)
        if time.time() - last_eval > args.eval_minutes * 60 or time.time() - t0 > budget:
            stats = evaluate_detr(model.eval(), processor, val, batch_size=16, verbose=False)
            model.train()
            history.append({"step": step, "minutes": round((time.time() - t0) / 60, 2), **stats})
            print(f"eval step {step}: AP {stats['AP']:.3f} AP50 {stats['AP50']:.3f} AP75 {stats['AP75']:.3f}", flush=True)
            info = {"args": vars(args), "history": history}
            save_atomic(model, processor, workdir / "last", extra=info)
            if stats["AP"] > best:
                best = stats["AP"]
                save_atomic(model, processor, workdir / "best", extra=info)
            last_eval = time.time()

    from transformers import DetrForObjectDetection

    model = DetrForObjectDetection.from_pretrained(workdir / "best").eval()
    info = json.loads((workdir / "best" / "train_info.json").read_text())
    save_atomic(model, processor, out, dtype=torch.float16, extra=info)
    print(f"exported {workdir / 'best'} (val AP {best:.3f}) to {out} in float16", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
