"""GPU wall-clock of the Triton kernels against cuBLAS dense MLPs at GPT-2-125M shapes, in one short run.

    python experiments/gpu_bench.py --out runs/gpu_bench          # writes gpu_bench.json and gpu_bench.md
    python experiments/gpu_bench.py --dry-run                     # the case list, no GPU needed
    python experiments/gpu_bench.py --smoke --out /tmp/b          # every case at toy sizes on CPU, interpreted

Sections, in priority order (a global time budget skips what no longer fits, so the run always ends
in time): the machine's own yardsticks (cuBLAS bf16 / fp32 / tf32 matmul peak, device copy bandwidth);
tree inference (1x11 and 16x7 trees, d_model 768) against the dense 768-3072-768 GELU MLP at 1, 16, 256
and 2048 tokens in bf16 and fp32; the sparse MLP with per-token lists at 50 % and 90 % sparsity against
the same dense MLP; tree training forward+backward at 4096 tokens against the dense MLP's; the exact ReLU
skip (dense fc1, fc2 over the non-zeros) and the CATS gate skip (dense gate, the kept neurons' rows) against
the dense MLP; and launch-plan
variants (lookahead depth, fused/tiled output, token blocks, in-block reduction of the backward's
atomics, list splitting) for tuning the launch choices.

Each case first checks its result against the torch definition on the same inputs (max error, share
of tokens whose leaf differs; bf16 routing may legitimately differ where |z| is within rounding of 0),
then times it: warm-up (the first call compiles), then the median of repeated calls measured with CUDA
events ("eager", Python launch overhead included) and, where capture works, of CUDA-graph replays
("graph", the GPU's own time). Numbers are this process's, on whatever GPU it runs on.
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # Triton fixes interpreted vs compiled when torch first imports it
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SECTIONS = ("peak", "tree_infer", "mlp", "tree_train", "skip", "variants")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GELU = 0  # dynsparse.activations code


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="folder for gpu_bench.json and gpu_bench.md (default: $OUT)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting cases after this many seconds (default 420, so a run ends within 8 min)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list among {','.join(SECTIONS)}")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list among bf16,fp32")
    p.add_argument("--tokens", default="1,16,256,2048", help="token counts for inference and the sparse MLP")
    p.add_argument("--train-tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-ff", type=int, default=3072)
    p.add_argument("--trees", default="1x11,16x7", help="comma list of TREESxDEPTH")
    p.add_argument("--sparsities", default="0.5,0.9", help="shares of neurons each token skips")
    p.add_argument("--act-position", choices=("node", "path"), default="node")
    p.add_argument("--target-s", type=float, default=0.25, help="time spent repeating one measurement")
    p.add_argument("--dry-run", action="store_true", help="print the case list and exit (no GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="run every case at toy sizes on CPU in Triton's interpreter (checks the code path)")
    a = p.parse_args(argv)
    a.sections = _choices("--sections", a.sections, SECTIONS)
    a.dtypes = _choices("--dtypes", a.dtypes, tuple(DTYPES))
    a.tokens = _ints("--tokens", a.tokens)
    a.sparsities = [float(s) for s in a.sparsities.split(",") if s]
    if not all(0.0 <= s < 1.0 for s in a.sparsities):
        p.error(f"--sparsities must lie in [0, 1), got {a.sparsities}")
    try:
        a.trees = [tuple(int(v) for v in s.lower().split("x")) for s in a.trees.split(",") if s]
    except ValueError:
        p.error(f"--trees must look like 16x7,1x11, got {a.trees!r}")
    if not a.trees or any(len(t) != 2 or t[0] < 1 or t[1] < 0 for t in a.trees):
        p.error(f"--trees must look like 16x7,1x11, got {a.trees}")
    for name in ("budget_s", "target_s"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if a.train_tokens < 1 or a.d_model < 1 or a.d_ff < 1:
        p.error("--train-tokens, --d-model and --d-ff must be >= 1")
    if a.smoke:  # toy sizes: the interpreter runs every program in Python
        a.tokens, a.train_tokens, a.d_model, a.d_ff = [1, 5], 6, 24, 48
        a.trees = [(1, 3), (3, 2)]
        a.target_s = 0.01
    if not a.dry_run and not a.out:
        p.error("--out is required (or set $OUT)")
    return a


def _choices(flag, text, allowed):
    got = [s for s in text.split(",") if s]
    bad = [s for s in got if s not in allowed]
    if bad or not got:
        raise SystemExit(f"{flag} must be a comma list among {','.join(allowed)}, got {text!r}")
    return got


def _ints(flag, text):
    try:
        got = [int(s) for s in text.split(",") if s]
    except ValueError:
        raise SystemExit(f"{flag} must be a comma list of integers, got {text!r}") from None
    if not got or min(got) < 1:
        raise SystemExit(f"{flag} must be integers >= 1, got {text!r}")
    return got


# ------------------------------------------------------------------------------------------ the cases
def plan_cases(a) -> list[dict]:
    """Every case of the run, in the order it runs; each a dict of plain values (printable, JSON-able)."""
    cases = []
    if "peak" in a.sections:
        n = 512 if a.smoke else 8192
        for dt in ("bf16", "tf32", "fp32"):
            cases.append({"section": "peak", "kind": "matmul", "dtype": dt, "n": n})
        cases.append({"section": "peak", "kind": "copy", "bytes": (1 << 20) if a.smoke else (1 << 30)})
    if "tree_infer" in a.sections:
        for dt in a.dtypes:
            for trees, depth in a.trees:
                for m in a.tokens:
                    cases.append({"section": "tree_infer", "dtype": dt, "trees": trees, "depth": depth, "m": m})
    if "mlp" in a.sections:
        for dt in a.dtypes:
            for s in a.sparsities:
                for m in a.tokens:
                    cases.append({"section": "mlp", "dtype": dt, "sparsity": s, "m": m, "strategy": "token",
                                  "group": 1})
    if "tree_train" in a.sections:
        for dt in a.dtypes:
            for trees, depth in sorted(a.trees, key=lambda t: -t[0]):  # the many-tree shape first
                cases.append({"section": "tree_train", "dtype": dt, "trees": trees, "depth": depth,
                              "m": a.train_tokens})
    if "skip" in a.sections:
        for dt in a.dtypes:
            for m in a.tokens:
                cases.append({"section": "skip", "op": "relu_skip", "dtype": dt, "m": m})
                for s in a.sparsities:
                    cases.append({"section": "skip", "op": "gate_skip", "dtype": dt, "m": m, "sparsity": s})
    if "variants" in a.sections:
        dt = a.dtypes[0]
        few, many = min(a.tokens), max(a.tokens)
        for trees, depth in a.trees:
            for m in sorted({few, many}):
                for sub in sorted({1, 2, 3, 4} & set(range(1, depth + 2))):
                    for fused in (True, False):
                        cases.append({"section": "variants", "op": "tree_infer", "dtype": dt, "trees": trees,
                                      "depth": depth, "m": m, "plan": {"sub": sub, "fused": fused}})
            for block_m in (8, 32, 64):
                cases.append({"section": "variants", "op": "tree_infer", "dtype": dt, "trees": trees, "depth": depth,
                              "m": many, "plan": {"sub": 1, "fused": False, "block_m": block_m}})
        for trees, depth in a.trees:  # backward only: the weight-gradient atomics and their in-block reduction
            for pre, block_m in ((0, 16), (4, 16), (16, 16), (4, 32), (16, 64)):
                cases.append({"section": "variants", "op": "tree_train", "dtype": dt, "trees": trees, "depth": depth,
                              "m": a.train_tokens, "plan": {"pre": pre, "block_m": block_m}})
        s = max(a.sparsities)
        for m in sorted({few, many}):
            for parts in (1, 8, 32):
                cases.append({"section": "variants", "op": "mlp", "dtype": dt, "sparsity": s, "m": m,
                              "strategy": "token", "group": 1, "plan": {"parts_h": parts, "parts_out": parts}})
            for group in (4, 8) if a.smoke else (32, 128):
                if a.d_ff % group == 0:
                    cases.append({"section": "variants", "op": "mlp", "dtype": dt, "sparsity": s, "m": m,
                                  "strategy": "grouped", "group": group})
    return cases


# ------------------------------------------------------------------------------------------ timing
class Clock:
    """Median time of one call: CUDA events on a GPU (eager and CUDA-graph replay), perf_counter on CPU."""

    def __init__(self, device, target_s):
        self.device, self.target_s = device, target_s
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def measure(self, fn, graph=True) -> dict:
        fn()  # compiles on first use
        self.sync()
        first = [self._once(fn) for _ in range(3)]
        per = max(statistics.median(first), 1e-7)
        reps = int(min(200, max(5, self.target_s / per)))
        times = [self._once(fn) for _ in range(reps)]
        out = {"eager_us": 1e6 * statistics.median(times), "reps": reps}
        if graph and self.cuda:
            out.update(self._graph(fn, per))
        return out

    def _graph(self, fn, per) -> dict:
        try:
            calls = int(min(50, max(1, 0.02 / per)))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(calls):
                    fn()
            g.replay()
            self.sync()
            reps = int(min(50, max(3, self.target_s / max(per * calls, 1e-7))))
            times = [self._once(g.replay) / calls for _ in range(reps)]
            del g
            return {"graph_us": 1e6 * statistics.median(times)}
        except Exception as e:  # capture is a bonus; eager timing stands on its own
            return {"graph_error": f"{type(e).__name__}: {str(e)[:200]}"}


# ------------------------------------------------------------------------------------------ operands
def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def dense_mlp(a, device, dtype, seed=0):
    g = _gen(device, seed)
    d, f = a.d_model, a.d_ff
    w1 = (torch.randn(f, d, generator=g, device=device) * d**-0.5).to(dtype)
    b1 = (torch.randn(f, generator=g, device=device) * 0.1).to(dtype)
    w2 = (torch.randn(d, f, generator=g, device=device) * f**-0.5).to(dtype)
    b2 = (torch.randn(d, generator=g, device=device) * 0.1).to(dtype)
    return w1, b1, w2, b2


def dense_forward(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def tree_weights(a, device, dtype, trees, depth, seed=1):
    g = _gen(device, seed)
    n = 2 ** (depth + 1) - 1
    w_in = (torch.randn(trees, n, a.d_model, generator=g, device=device) * a.d_model**-0.5).to(dtype)
    b_in = (torch.randn(trees, n, generator=g, device=device) * 0.1).to(dtype)
    w_out = (torch.randn(trees, n, a.d_model, generator=g, device=device) * (trees * (depth + 1)) ** -0.5).to(dtype)
    return w_in, b_in, w_out


def tokens(a, device, dtype, m, seed=2):
    return torch.randn(m, a.d_model, generator=_gen(device, seed), device=device).to(dtype)


def per_token_lists(a, device, m, sparsity, group, seed=3):
    """CSR lists keeping round((1 - sparsity) * lists) random neurons (or groups) per token, sorted."""
    n_lists = a.d_ff // group
    keep = max(1, round((1.0 - sparsity) * n_lists))
    order = torch.rand(m, n_lists, generator=_gen(device, seed), device=device).argsort(dim=1)[:, :keep]
    indices = order.sort(dim=1).values.to(torch.int32).reshape(-1)
    indptr = torch.arange(m + 1, device=device, dtype=torch.int64) * keep
    return indptr, indices, keep


# ------------------------------------------------------------------------------------------ one case each
class Runner:
    def __init__(self, a, device):
        self.a, self.device = a, device
        self.clock = Clock(device, a.target_s)
        self._dense = {}

    def dense(self, dtype_name, m) -> dict:
        """The dense MLP's time at m tokens (cached: every section compares with the same number)."""
        key = (dtype_name, m)
        if key not in self._dense:
            dtype = DTYPES[dtype_name]
            w = dense_mlp(self.a, self.device, dtype)
            x = tokens(self.a, self.device, dtype, m)
            self._dense[key] = self.clock.measure(lambda: dense_forward(x, *w))
        return self._dense[key]

    def run(self, c) -> dict:
        kind = c.get("op", c["section"])
        return getattr(self, f"_{c['kind'] if c['section'] == 'peak' else kind}")(c)

    # yardsticks
    def _matmul(self, c):
        n = c["n"]
        dtype = torch.bfloat16 if c["dtype"] == "bf16" else torch.float32
        x = torch.randn(n, n, device=self.device).to(dtype)
        y = torch.randn(n, n, device=self.device).to(dtype)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = c["dtype"] == "tf32"
        try:
            t = self.clock.measure(lambda: x @ y, graph=False)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        t["tflops"] = 2 * n**3 / (t["eager_us"] * 1e-6) / 1e12
        return t

    def _copy(self, c):
        n = c["bytes"] // 4
        src, dst = torch.empty(n, device=self.device), torch.empty(n, device=self.device)
        src.normal_()
        t = self.clock.measure(lambda: dst.copy_(src), graph=False)
        t["gb_per_s"] = 2 * n * 4 / (t["eager_us"] * 1e-6) / 1e9  # read + write
        return t

    # tree inference
    def _tree_infer(self, c):
        from dynsparse.ops.tree.reference import tree_ff_masked
        from dynsparse.ops.tree.triton import launch_plan, tree_infer_triton

        dtype = DTYPES[c["dtype"]]
        trees, depth, m = c["trees"], c["depth"], c["m"]
        w_in, b_in, w_out = tree_weights(self.a, self.device, dtype, trees, depth)
        x = tokens(self.a, self.device, dtype, m)
        on_path = self.a.act_position == "path"
        plan = c.get("plan")
        y, leaves = tree_infer_triton(x, w_in, b_in, w_out, depth, GELU, on_path, plan=plan)
        ref, ref_leaves = tree_ff_masked(x.float(), w_in.float(), b_in.float(), w_out.float(), depth, "gelu",
                                         self.a.act_position)
        out = {"max_err": (y.float() - ref).abs().max().item(), "ref_scale": ref.abs().max().item(),
               "leaf_mismatch": (leaves != ref_leaves).float().mean().item(),
               "plan": dict(launch_plan(m, trees, depth, self.a.d_model, self.a.d_model), **(plan or {}))}
        del ref
        out.update(self.clock.measure(lambda: tree_infer_triton(x, w_in, b_in, w_out, depth, GELU, on_path, plan=plan)))
        if c["section"] != "variants":
            out["dense"] = self.dense(c["dtype"], m)
        return out

    # sparse MLP
    def _mlp(self, c):
        from dynsparse.ops.mlp.triton import launch_plan, sparse_mlp_triton

        dtype = DTYPES[c["dtype"]]
        m, group, strategy = c["m"], c["group"], c["strategy"]
        w1, b1, w2, b2 = dense_mlp(self.a, self.device, dtype)
        w2_t = w2.t().contiguous()
        x = tokens(self.a, self.device, dtype, m)
        indptr, indices, keep = per_token_lists(self.a, self.device, m, c["sparsity"], group)
        plan = c.get("plan")

        def call():
            return sparse_mlp_triton(x, w1, b1, w2_t, b2, None, None, None, indptr, indices, strategy, group, GELU,
                                     plan=plan)

        y = call()
        mask = torch.zeros(m, self.a.d_ff // group, device=self.device)
        mask.scatter_(1, indices.view(m, keep).long(), 1.0)
        mask = mask.repeat_interleave(group, dim=1)
        ref = (F.gelu(F.linear(x.float(), w1.float(), b1.float())) * mask) @ w2_t.float() + b2.float()
        out = {"max_err": (y.float() - ref).abs().max().item(), "ref_scale": ref.abs().max().item(),
               "neurons_per_token": keep * group,
               "plan": dict(launch_plan(m, self.a.d_ff, self.a.d_model, self.a.d_ff), **(plan or {}))}
        del ref, mask
        out.update(self.clock.measure(call))
        if c["section"] != "variants":
            out["dense"] = self.dense(c["dtype"], m)
        return out

    # the skip ops: a dense projection, then only the rows of the neurons it keeps
    def _skip_case(self, c, call, ref, kept):
        y = call()
        out = {"max_err": (y.float() - ref.float()).abs().max().item(), "ref_scale": ref.float().abs().max().item(),
               "kept": kept}
        out.update(self.clock.measure(call, graph=False))  # the lists' length is read back: no graph capture
        out["dense"] = self.dense(c["dtype"], c["m"])
        return out

    def _relu_skip(self, c):
        from dynsparse.ops.mlp.reference import relu_skip_mlp_reference
        from dynsparse.ops.mlp.triton import relu_skip_mlp_triton

        w1, b1, w2, b2 = dense_mlp(self.a, self.device, DTYPES[c["dtype"]])
        w2_t = w2.t().contiguous()
        x = tokens(self.a, self.device, DTYPES[c["dtype"]], c["m"])
        kept = (F.linear(x.float(), w1.float(), b1.float()) > 0).float().mean().item()
        return self._skip_case(c, lambda: relu_skip_mlp_triton(x, w1, b1, w2_t, b2),
                               relu_skip_mlp_reference(x, w1, b1, w2_t, b2), kept)

    def _gate_skip(self, c):
        from dynsparse.ops.mlp.reference import gate_skip_mlp_reference
        from dynsparse.ops.mlp.triton import gate_skip_mlp_triton

        w1, b1, w2, b2 = dense_mlp(self.a, self.device, DTYPES[c["dtype"]])
        w2_t = w2.t().contiguous()
        x = tokens(self.a, self.device, DTYPES[c["dtype"]], c["m"])
        a = F.gelu(F.linear(x.float(), w1.float(), b1.float())).abs().flatten()
        t = torch.quantile(a[: 1 << 24], c["sparsity"])  # the threshold that skips that share of this batch
        kept = (a > t).float().mean().item()
        ref = gate_skip_mlp_reference(x, w1, b1, w2_t, b2, None, None, None, t, GELU)
        return self._skip_case(c, lambda: gate_skip_mlp_triton(x, w1, b1, w2_t, b2, None, None, None, t, GELU),
                               ref, kept)

    # tree training
    def _tree_train(self, c):
        from dynsparse.ops.tree.reference import tree_ff_masked
        from dynsparse.ops.tree.triton import tree_train_backward_triton, tree_train_forward_triton

        dtype = DTYPES[c["dtype"]]
        trees, depth, m = c["trees"], c["depth"], c["m"]
        w_in, b_in, w_out = tree_weights(self.a, self.device, dtype, trees, depth)
        x = tokens(self.a, self.device, dtype, m)
        grad_y = tokens(self.a, self.device, dtype, m, seed=5)
        on_path = self.a.act_position == "path"
        pos = self.a.act_position

        def fwd():
            return tree_train_forward_triton(x, w_in, b_in, w_out, depth, GELU, on_path)

        y, idx, zs = fwd()

        bwd_plan = {"pre": 4, "block_m": None, **c.get("plan", {})}

        def bwd():
            return tree_train_backward_triton(grad_y, x, w_in, b_in, w_out, idx, zs, GELU, on_path, **bwd_plan)

        def both():
            _, i, z = fwd()
            return tree_train_backward_triton(grad_y, x, w_in, b_in, w_out, i, z, GELU, on_path, **bwd_plan)

        grads = bwd()
        leaves = [t.float().requires_grad_() for t in (x, w_in, b_in, w_out)]
        ref, _ = tree_ff_masked(*leaves, depth, "gelu", pos)
        ref.backward(grad_y.float())
        names = ("g_x", "g_w_in", "g_b_in", "g_w_out")
        out = {"max_err": {k: (g.float() - r.grad).abs().max().item() for k, g, r in zip(names, grads, leaves)},
               "ref_scale": {k: r.grad.abs().max().item() for k, r in zip(names, leaves)},
               "y_err": (y.float() - ref.detach()).abs().max().item()}
        del ref, leaves
        if c["section"] == "variants":
            out["plan"] = bwd_plan
            out.update(self.clock.measure(bwd, graph=False))
            return out
        out["forward"] = self.clock.measure(fwd, graph=False)
        out["backward"] = self.clock.measure(bwd, graph=False)
        out.update(self.clock.measure(both, graph=False))

        w = [t.detach().requires_grad_() for t in dense_mlp(self.a, self.device, dtype)]
        xd = x.detach().requires_grad_()

        def dense_both():
            dense_forward(xd, *w).backward(grad_y)

        out["dense"] = self.clock.measure(dense_both, graph=False)
        return out


# ------------------------------------------------------------------------------------------ report
def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(meta, records) -> str:
    lines = ["# GPU benchmark of the Triton kernels", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['elapsed_s']:.0f} s of "
             f"{meta['budget_s']:.0f} s budget; {meta['skipped']} cases skipped, {meta['errors']} failed."
             + (" SMOKE RUN (toy sizes, CPU interpreter): times mean nothing." if meta["smoke"] else ""), "",
             "Times are medians in microseconds; eager includes Python launch overhead, graph is CUDA-graph replay.",
             ""]
    ok = [r for r in records if "result" in r]
    peak = [r for r in ok if r["section"] == "peak"]
    if peak:
        lines += ["## Yardsticks", "", "| what | result |", "|---|---|"]
        for r in peak:
            res = r["result"]
            if r["kind"] == "matmul":
                lines.append(f"| cuBLAS matmul {r['dtype']} n={r['n']} | {res['tflops']:.1f} TFLOP/s |")
            else:
                lines.append(f"| device copy {r['bytes'] >> 20} MiB | {res['gb_per_s']:.0f} GB/s (read+write) |")
        lines.append("")

    def speed_table(title, rows, label):
        if not rows:
            return
        lines.extend([f"## {title}", "",
                      f"| dtype | {label} | tokens | kernel eager | kernel graph | dense eager | dense graph "
                      "| dense/kernel (eager) | dense/kernel (graph) | max err / scale |",
                      "|---|---|---|---|---|---|---|---|---|---|"])
        for r in rows:
            res, d = r["result"], r["result"].get("dense", {})
            ge, gd = res.get("graph_us"), d.get("graph_us")
            extra = f" (leaf mismatch {res['leaf_mismatch']:.2%})" if res.get("leaf_mismatch") else ""
            lines.append(
                f"| {r['dtype']} | {_label(r)} | {r['m']} | {_fmt(res['eager_us'])} | {_fmt(ge)} | "
                f"{_fmt(d.get('eager_us'))} | {_fmt(gd)} | {_fmt(d.get('eager_us', 0) / res['eager_us'], 2)} | "
                f"{_fmt(gd / ge if ge and gd else None, 2)} | {res['max_err'] / max(res['ref_scale'], 1e-30):.1e}"
                f"{extra} |")
        lines.append("")

    speed_table("Tree inference vs dense MLP", [r for r in ok if r["section"] == "tree_infer"], "trees x depth")
    speed_table("Sparse MLP (per-token lists) vs dense MLP", [r for r in ok if r["section"] == "mlp"], "sparsity")
    speed_table("Skip ops (dense projection, then the kept rows) vs dense MLP",
                [r for r in ok if r["section"] == "skip"], "op (kept share)")
    train = [r for r in ok if r["section"] == "tree_train"]
    if train:
        lines += ["## Tree training (forward + backward) vs dense MLP forward + backward", "",
                  "| dtype | trees x depth | tokens | forward | backward | both | dense both | dense/tree "
                  "| worst grad err / scale |", "|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            res = r["result"]
            worst = max(res["max_err"][k] / max(res["ref_scale"][k], 1e-30) for k in res["max_err"])
            lines.append(f"| {r['dtype']} | {r['trees']}x{r['depth']} | {r['m']} | "
                         f"{_fmt(res['forward']['eager_us'])} | {_fmt(res['backward']['eager_us'])} | "
                         f"{_fmt(res['eager_us'])} | {_fmt(res['dense']['eager_us'])} | "
                         f"{res['dense']['eager_us'] / res['eager_us']:.2f} | {worst:.1e} |")
        lines.append("")
    var = [r for r in ok if r["section"] == "variants"]
    if var:
        lines += ["## Launch-plan variants", "", "| op | dtype | shape | tokens | plan | eager | graph |",
                  "|---|---|---|---|---|---|---|"]
        for r in var:
            res = r["result"]
            lines.append(f"| {r['op']} | {r['dtype']} | {_label(r)} | {r['m']} | {json.dumps(res['plan'])} | "
                         f"{_fmt(res['eager_us'])} | {_fmt(res.get('graph_us'))} |")
        lines.append("")
    bad = [r for r in records if "result" not in r]
    if bad:
        lines += ["## Not measured", ""]
        lines += [f"- {_case_name(r)}: {r.get('skipped') or r.get('error')}" for r in bad]
        lines.append("")
    return "\n".join(lines)


def _label(r):
    if r["section"] == "skip":
        return f"{r['op']}" + (f" at {r['sparsity']:.0%}" if "sparsity" in r else "") + (
            f" ({r['result']['kept']:.0%} kept)" if "result" in r else "")
    if "trees" in r:
        return f"{r['trees']}x{r['depth']}"
    return f"{r['sparsity']:.0%} {r['strategy']}" + (f" g{r['group']}" if r["group"] > 1 else "")


def _case_name(c):
    keys = [k for k in c if k not in ("result", "error", "skipped", "seconds")]
    return ", ".join(f"{k}={json.dumps(c[k]) if isinstance(c[k], dict) else c[k]}" for k in keys)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    cases = plan_cases(a)
    if a.dry_run:
        for c in cases:
            print(_case_name(c))
        print(f"{len(cases)} cases; budget {a.budget_s:.0f} s")
        return cases
    if a.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times GPU kernels (use --smoke or --dry-run on CPU)")
    else:
        device = torch.device("cuda")
    import triton

    t0 = time.monotonic()
    runner = Runner(a, device)
    records = []
    for c in cases:
        rec = dict(c)
        used = time.monotonic() - t0
        if used > a.budget_s:
            rec["skipped"] = f"time budget spent ({used:.0f} s of {a.budget_s:.0f} s)"
        else:
            start = time.monotonic()
            try:
                rec["result"] = runner.run(c)
            except Exception as e:  # one broken case must not cost the others
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rec["seconds"] = round(time.monotonic() - start, 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(rec)
        status = "ok" if "result" in rec else rec.get("error") or rec.get("skipped")
        print(f"[{time.monotonic() - t0:6.1f}s] {_case_name(c)}: {status}", flush=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "budget_s": a.budget_s, "elapsed_s": time.monotonic() - t0, "smoke": a.smoke,
            "d_model": a.d_model, "d_ff": a.d_ff, "act_position": a.act_position,
            "skipped": sum("skipped" in r for r in records), "errors": sum("error" in r for r in records)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str))
    (out / "gpu_bench.md").write_text(markdown(meta, records))
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    return records


if __name__ == "__main__":
    main()
