"""The benchmark cases of issue 5: each times a dynsparse path and its strongest dense baseline in the
same process, same dtype (fp32), same threads, and reports the ratio with achieved GFLOP/s and GB/s.

FLOPs count 2 per multiply-add of the work actually done. Bytes are the least traffic the work needs:
inputs, outputs and every weight row read once (for the sparse paths: only the rows that were used).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..ops.backend import resolve
from ..ops.gates import grouped_gate_groups, lowrank_gate_indices
from ..ops.mlp import SPARSE_MLP_BACKENDS, MLPWeights, choose_strategy, relu_skip_mlp, sparse_mlp
from ..ops.tree import supported_backends, tree_infer
from ..tree import TreeFF
from .timing import median_time

F32 = 4


@dataclass
class Result:
    case: str
    baseline: str
    baseline_ms: float
    dynsparse_ms: float
    target: float | None  # required baseline/dynsparse ratio (None: report only)
    flops: float  # of the dynsparse path
    bytes: float
    baseline_flops: float
    baseline_bytes: float
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.baseline_ms / self.dynsparse_ms

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            ratio=self.ratio,
            met=self.met,
            gflops=self.flops / self.dynsparse_ms / 1e6,
            gbps=self.bytes / self.dynsparse_ms / 1e6,
            baseline_gflops=self.baseline_flops / self.baseline_ms / 1e6,
            baseline_gbps=self.baseline_bytes / self.baseline_ms / 1e6,
        )
        return out


@dataclass
class Settings:
    warmup: int = 2
    repeats: int = 5
    min_time: float = 0.05  # seconds per timed sample (short calls are looped)
    d_model: int = 768
    d_ff: int = 3072
    tree_tokens: tuple = (1, 16, 256, 2048)
    forest_tokens: int = 2048
    train_tokens: int = 4096
    mgs_tokens: int = 850
    mgs_d_model: int = 256
    mgs_d_ff: int = 2048
    union_tokens: int = 256
    lm_new_tokens: int = 128
    lm_preset: str = "small"
    peak_matmul_n: int = 1536  # GEMM size of the compute-peak measurement
    peak_megabytes: int = 256  # buffer of the bandwidth measurement (far beyond the caches)
    seed: int = 0


def _time(fn, s: Settings) -> float:
    """Median ms; calls slower than half a second get one warm-up and three samples (keeps `all`
    under five minutes; their spread is small relative to their length)."""
    t0 = time.perf_counter()
    fn()  # first call: compiles / loads kernels, faults in memory
    if time.perf_counter() - t0 > 0.5:
        return median_time(fn, warmup=min(s.warmup, 1), repeats=min(s.repeats, 3)) * 1e3
    return median_time(fn, warmup=s.warmup, repeats=s.repeats, min_time=s.min_time) * 1e3


def gelu_mlp(d: int, d_ff: int, act=nn.GELU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d_ff), act(), nn.Linear(d_ff, d))


def _dense_cost(m: int, d: int, d_ff: int, passes: int = 1):
    flops = passes * 2 * m * 2 * d * d_ff
    return flops, (2 * d * d_ff + d_ff + d) * F32 + passes * 2 * m * d * F32


def _visited_nodes(leaves: torch.Tensor, depth: int) -> int:
    """Distinct (tree, node) pairs on the paths ending at these leaves."""
    trees = leaves.shape[1]
    node = leaves + (2**depth - 1)
    total = 0
    for _ in range(depth + 1):
        total += sum(int(torch.unique(node[:, t]).numel()) for t in range(trees))
        node = (node - 1) // 2
    return total


# ------------------------------------------------------------------------------------- tree
def tree_inference(s: Settings, depth: int, trees: int, m: int, target: float | None) -> Result:
    torch.manual_seed(s.seed)
    d, d_ff = s.d_model, s.d_ff
    layer = TreeFF(d, depth, trees=trees).eval()
    mlp = gelu_mlp(d, d_ff).eval()
    x = torch.randn(m, d)
    with torch.no_grad():
        base = _time(lambda: mlp(x), s)
        ours = _time(lambda: layer(x), s)
        args = (x, layer.w_in, layer.b_in, layer.w_out, depth, layer.activation, "node", "numba")
        kernel = _time(lambda: tree_infer(*args), s)
        _, leaves = tree_infer(*args)
    flops = m * layer.flops_per_token
    nbytes = 2 * m * d * F32 + _visited_nodes(leaves, depth) * (2 * d + 1) * F32
    bflops, bbytes = _dense_cost(m, d, d_ff)
    return Result(
        f"tree {trees}x{depth} inference, {m} token{'s' if m != 1 else ''}", f"GELU MLP {d}-{d_ff}-{d}", base, ours, target,
        flops, nbytes, bflops, bbytes, {"kernel_only_ms": kernel, "module": "TreeFF.eval() under no_grad"},
    )


def tree_bf16(s: Settings, m: int) -> Result:
    """bf16 weight tables (read as bf16, widened in registers) against the dense MLP in bf16, with the
    same layer's fp32 time beside it: whether halving the bytes pays on this CPU."""
    torch.manual_seed(s.seed)
    d, d_ff = s.d_model, s.d_ff
    layer = TreeFF(d, 11).eval()
    mlp = gelu_mlp(d, d_ff).eval().bfloat16()
    x = torch.randn(m, d)
    with torch.no_grad():
        fp32 = _time(lambda: layer(x), s)
        layer.bfloat16()
        x16 = x.bfloat16()
        base = _time(lambda: mlp(x16), s)
        ours = _time(lambda: layer(x16), s)
    bflops, bbytes = _dense_cost(m, d, d_ff)
    return Result(f"tree 1x11 inference, {m} tokens, bf16 weights", f"GELU MLP {d}-{d_ff}-{d} in bf16", base, ours,
                  None, m * layer.flops_per_token, 0.0, bflops, bbytes / 2,
                  {"fp32_tree_ms": fp32, "bf16_over_fp32_speedup": fp32 / ours})


def tree_cases(s: Settings) -> list[Result]:
    out = []
    for m in s.tree_tokens:
        out.append(tree_inference(s, 11, 1, m, 150.0 if m <= 16 else 100.0))
    out.append(tree_inference(s, 7, 16, s.forest_tokens, 15.0))
    out.append(tree_bf16(s, s.tree_tokens[-1]))
    return out


# ------------------------------------------------------------------------------------- train
def train_cases(s: Settings) -> list[Result]:
    torch.manual_seed(s.seed)
    d, d_ff, m = s.d_model, s.d_ff, s.train_tokens
    layer = TreeFF(d, 11).train()
    mlp = gelu_mlp(d, d_ff).train()
    x = torch.randn(m, d, requires_grad=True)
    g = torch.randn(m, d)

    def step(module):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).backward(g)

        return run

    base = _time(step(mlp), s)
    ours = _time(step(layer), s)
    flops = 3 * m * layer.flops_per_token  # forward + backward (input and weight gradients)
    with torch.no_grad():
        leaves = tree_infer(x, layer.w_in, layer.b_in, layer.w_out, 11, "gelu")[1]
    nbytes = 6 * m * d * F32 + _visited_nodes(leaves, 11) * (2 * d + 1) * F32 * 3
    bflops, bbytes = _dense_cost(m, d, d_ff, passes=3)
    return [Result(f"tree 1x11 forward+backward, {m} tokens", f"GELU MLP {d}-{d_ff}-{d} fwd+bwd", base, ours, 5.0,
                   flops, nbytes, bflops, bbytes + 2 * d * d_ff * F32 * 2, 
                   {"backend": resolve(layer.backend, x.device, supported_backends(x, layer.w_in, train=True))})]


# ------------------------------------------------------------------------------------- mgs
def _relu_mlp_at_density(d, d_ff, x, density, seed):
    """A ReLU MLP whose fc1 outputs on x are positive for ~density of (token, neuron) pairs, so the
    exact ReLU skip works at the same sparsity as the gate."""
    torch.manual_seed(seed)
    mlp = gelu_mlp(d, d_ff, act=nn.ReLU).eval()
    with torch.no_grad():
        z = x @ mlp[0].weight.t()
        mlp[0].bias.copy_(-torch.quantile(z[: min(len(z), 2048)], 1 - density, dim=0))
    return mlp


def _grouped_gate(x, d_ff, density, group, seed):
    torch.manual_seed(seed + 1)
    G = torch.randn(x.shape[1], d_ff // group) / x.shape[1] ** 0.5
    logits = x @ G
    thr = torch.quantile(logits[: min(len(logits), 2048)], 1 - density, dim=0) if len(x) > 1 else torch.quantile(logits[0], 1 - density)
    return G, thr


def _backend(x: torch.Tensor) -> str:
    """The backend ``sparse_mlp(backend="auto")`` runs for x."""
    return resolve("auto", x.device, SPARSE_MLP_BACKENDS)


def mgs_block(s: Settings, m: int, d: int, d_ff: int, density: float = 0.1, group: int = 16) -> list[Result]:
    """GatedMLP's kernels at a fixed density: the grouped gate with the group-sparse kernel (what a
    grouped ``GatedMLP`` runs), and the low-rank gate with the per-token kernel."""
    torch.manual_seed(s.seed)
    x = torch.randn(m, d)
    calib = torch.randn(max(m, 512), d)  # gate and bias quantiles from other tokens than the timed ones
    mlp = _relu_mlp_at_density(d, d_ff, calib, density, s.seed)
    weights = MLPWeights.from_linear(mlp[0], mlp[2])
    w1, b1 = weights.w1, weights.b1
    G, thr = _grouped_gate(calib, d_ff, density, group, s.seed)
    r = 32
    A, B = torch.randn(d, r) / d**0.5, torch.randn(r, d_ff) / r**0.5
    lr_thr = torch.quantile(((calib @ A) @ B)[:512], 1 - density, dim=0)

    def grouped():
        ip, groups = grouped_gate_groups(x, G, None, thr)
        return sparse_mlp(x, weights, ip, groups, activation="relu", strategy="grouped", group_size=group)

    def lowrank():
        ip, ix = lowrank_gate_indices(x, A, B, None, lr_thr)
        return sparse_mlp(x, weights, ip, ix, activation="relu")

    with torch.no_grad():
        base = _time(lambda: mlp(x), s)
        skip = _time(lambda: relu_skip_mlp(x, weights), s)
        ours_g = _time(grouped, s)
        ours_lr = _time(lowrank, s) if m > 1 else None
        _, groups = grouped_gate_groups(x, G, None, thr)
        used = torch.unique(groups).numel()
        relu_density = float((torch.relu(x @ w1.t() + b1) > 0).float().mean())
        _, ix_lr = lowrank_gate_indices(x, A, B, None, lr_thr) if m > 1 else (None, None)
    nnz_g = groups.numel() * group
    shape = f"{d}-{d_ff}-{d}"
    bflops, bbytes = _dense_cost(m, d, d_ff)
    gate_flops = 2 * m * d * (d_ff // group)
    g_flops = gate_flops + 2 * nnz_g * 2 * d
    g_bytes = 2 * m * d * F32 + d * (d_ff // group) * F32 + used * group * 2 * d * F32
    skip_flops = 2 * m * d * d_ff + 2 * int(relu_density * m * d_ff) * d
    info = {"gate_density": nnz_g / (m * d_ff), "relu_density": relu_density, "kernel": "sparse_mlp (grouped)",
            "group_size": group}
    label = f"MGS {shape}, {m} token{'s' if m > 1 else ''}, grouped gate (g={group})"
    out = [
        Result(label, f"dense ReLU MLP {shape}", base, ours_g, 2.5 if m > 1 else 3.0, g_flops, g_bytes, bflops, bbytes, info),
    ]
    if m > 1:
        out.append(Result(label, "exact ReLU skip (dense fc1, fc2 over non-zeros)", skip, ours_g, 1.0, g_flops, g_bytes,
                          skip_flops, bbytes, info))
        lr_flops = 2 * m * r * (d + d_ff) + 2 * ix_lr.numel() * 2 * d
        out.append(Result(f"MGS {shape}, {m} tokens, low-rank gate (r={r})", f"dense ReLU MLP {shape}", base, ours_lr,
                          None, lr_flops, g_bytes, bflops, bbytes,
                          {"rank": r, "gate_density": ix_lr.numel() / (m * d_ff), "kernel": f"sparse_mlp ({choose_strategy(m, ix_lr, d_ff, _backend(x))})"}))
    return out


def union_case(s: Settings, m: int, union_share: float, density: float = 0.1) -> Result:
    """Union path against the per-token path on lists whose union covers ``union_share`` of the neurons
    (tokens drawing their 10 % from a shared hot pool), and whether ``strategy="auto"`` picks the faster."""
    d, d_ff = s.mgs_d_model, s.mgs_d_ff
    g = torch.Generator().manual_seed(s.seed)
    x = torch.randn(m, d, generator=g)
    w1, b1 = torch.randn(d_ff, d, generator=g) / d**0.5, torch.zeros(d_ff)
    w2_t, b2 = torch.randn(d_ff, d, generator=g) / d_ff**0.5, torch.zeros(d)
    weights = MLPWeights(w1, b1, w2_t, b2)
    pool = torch.randperm(d_ff, generator=g)[: int(union_share * d_ff)]
    k = int(density * d_ff)
    lists = [pool[torch.randperm(len(pool), generator=g)[:k]].sort().values for _ in range(m)]
    indptr = torch.tensor([0] + [k * (i + 1) for i in range(m)], dtype=torch.int64)
    indices = torch.cat(lists).to(torch.int32)
    with torch.no_grad():
        per_token = _time(lambda: sparse_mlp(x, weights, indptr, indices, activation="relu", strategy="token"), s)
        union = _time(lambda: sparse_mlp(x, weights, indptr, indices, activation="relu", strategy="union"), s)
    union_size = int(torch.unique(indices).numel())
    picked = choose_strategy(m, indices, d_ff, _backend(x))
    faster = "union" if union < per_token else "token"
    flops = 2 * m * union_size * 2 * d
    return Result(f"MGS union path, {m} tokens at {density:.0%}, union {union_size / d_ff:.0%} of {d_ff}",
                  "per-token kernel (strategy token)", per_token, union, None, flops, 0.0, 2 * indices.numel() * 2 * d, 0.0,
                  {"dispatch_picks": picked, "faster": faster, "dispatch_right": picked == faster,
                   "union_size": union_size, "nnz": indices.numel()})


def mgs_cases(s: Settings) -> list[Result]:
    unions = [union_case(s, s.union_tokens, share) for share in (0.1, 0.25, 0.5, 1.0)]
    return mgs_block(s, s.mgs_tokens, s.mgs_d_model, s.mgs_d_ff) + mgs_block(s, 1, s.d_model, s.d_ff) + unions


# ------------------------------------------------------------------------------------- lm
class _NoFF(nn.Module):
    """Stands in for an FF block that costs nothing: the ceiling of any FF speed-up (Amdahl)."""

    def forward(self, x):
        return torch.zeros_like(x)


def lm_cases(s: Settings) -> list[Result]:
    """Greedy generation at batch 1 with the dense and the tree LM, and with the dense LM's FF blocks
    replaced by nothing: ``ceiling_ratio`` is the most any FF block could gain in this model."""
    try:
        from ..lm import DynSparseLMForCausalLM, preset_config
        from ..lm.model import Block
    except ImportError as e:  # the LM package is optional for the kernels
        raise RuntimeError(f"the lm case needs dynsparse.lm: {e}") from e
    n = s.lm_new_tokens
    times, flops = {}, {}
    prompt = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(s.seed))
    for variant in ("dense", "tree", "no FF"):
        torch.manual_seed(s.seed)
        ff = "tree" if variant == "tree" else "dense"
        config = preset_config(s.lm_preset, ff=ff, max_position_embeddings=max(512, n + 16))
        model = DynSparseLMForCausalLM(config).eval()
        if variant == "no FF":
            for block in model.modules():
                if isinstance(block, Block):
                    block.mlp = _NoFF()

        def gen(k=n, model=model):
            model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)

        with torch.no_grad():
            gen(4)  # warm-up: kernels loaded, caches allocated
            times[variant] = median_time(gen, warmup=0, repeats=max(1, s.repeats // 4)) * 1e3
        flops[variant] = n * config.num_hidden_layers * config.ff_flops_per_token
    cfg = preset_config(s.lm_preset)
    return [Result(f"tree LM ({s.lm_preset}: d={cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.tree['trees']}x{cfg.tree['depth']}) "
                   f"generating {n} tokens, batch 1", "dense LM of the same width", times["dense"], times["tree"], 1.5,
                   flops["tree"], 0.0, flops["dense"], 0.0,
                   {"tokens_per_s": n / times["tree"] * 1e3, "baseline_tokens_per_s": n / times["dense"] * 1e3,
                    "no_ff_ms": times["no FF"], "ceiling_ratio": times["dense"] / times["no FF"],
                    "flops": "FF blocks only"})]


SUITES = {"tree": tree_cases, "train": train_cases, "mgs": mgs_cases, "lm": lm_cases}
