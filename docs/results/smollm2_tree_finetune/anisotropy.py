"""Usage: python anisotropy.py OUT.json MODEL...   (MODEL: smollm2-135m or a saved model directory)
How concentrated each MLP block's inputs are, model by model, on 8,192 held-out tokens (Macbeth and The
Tempest, windows spread over the split): the mean cosine between two tokens' input vectors, and after
centring, the share of variance on the top principal direction and the effective rank (exp of the entropy
of the normalised eigenvalues). Inputs concentrated in a few directions leave most of a tree's half-spaces
empty, so its fit starves their nodes."""
import json, sys
import torch
from dynsparse.data import prepare_tokens, spread_windows, text_source
from dynsparse.lm.convert import load_model
from dynsparse.lm.pretrained import resolve_model

LAYERS = (0, 3, 9, 15, 20, 24, 27, 29)
torch.manual_seed(0)
rows = []
for name in sys.argv[2:]:
    path = resolve_model(name)
    model = load_model(path).eval()
    ids = spread_windows(prepare_tokens(text_source("shakespeare"), tokenizer_dir=str(path)).splits["test"], 8192, 256)
    seen = {i: [] for i in LAYERS}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1]).float())) for i in LAYERS]
    with torch.no_grad():
        for b in range(0, ids.shape[0], 4):
            model(input_ids=ids[b:b + 4], use_cache=False)
    for h in hooks:
        h.remove()
    for i in LAYERS:
        x = torch.cat(seen[i])
        unit = torch.nn.functional.normalize(x, dim=1)
        pick = torch.randperm(x.shape[0])[:2048]
        cos = unit[pick] @ unit[pick].T
        mean_cos = float((cos.sum() - cos.diagonal().sum()) / (cos.numel() - cos.shape[0]))
        ev = torch.linalg.eigvalsh(torch.cov(x.T)).clamp_min(0).flip(0)
        p = ev / ev.sum()
        rows.append({"model": name, "layer": i, "tokens": x.shape[0], "mean_cosine": mean_cos,
                     "top_pc_share": float(p[0]), "effective_rank": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))})
        print(f"{name} layer {i}: mean cosine {mean_cos:.3f}, top PC {float(p[0]):.3f}, "
              f"effective rank {rows[-1]['effective_rank']:.1f}", flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
