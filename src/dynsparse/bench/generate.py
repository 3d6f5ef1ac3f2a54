"""``dynsparse bench generate``: batch-1 greedy decoding and prefill of a real causal LM, dense and sparse
through the same compiled loop (``dynsparse.decode.FastDecoder``), beside HF's eager ``generate``.

Everything runs in one process at one thread count. For each dtype the model is loaded fresh per
variant: dense, the dense model with its MLP blocks replaced by a no-op (the time of everything but the
MLPs; MLP time = dense - no-op, so no timer sits inside a compiled graph), one variant per
``--sparsify`` directory (gates on the model) and one per ``--converted`` directory (the model with its
MLPs replaced, e.g. by trees). Every variant decodes with the fast loop's linear layers (``linears``,
"gemv" by default: ``dynsparse::gemv``), so sparse rows are measured against the fastest dense path;
the dense model also runs with torch's own ``F.linear`` ("torch linears") for reference. Each decode
figure sits beside its physical limit: the weight bytes one step reads
(``dynsparse.decode.weight_traffic``) over the copy bandwidth measured just before it.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .timing import cpu_name

DENSE_TARGET = 0.75  # the fast dense path reads its weights at >= 75 % of the measured copy bandwidth
SPARSE_TARGET = 0.85  # sparse decode reaches >= 85 % of the speed-up its weight bytes allow


@dataclass
class GenerateSettings:
    model: str  # a local model directory (``resolve_model`` output)
    sparsify: tuple[str, ...] = ()  # sparsified directories (``dynsparse sparsify --out``)
    converted: tuple[str, ...] = ()  # the model with other FF blocks (``dynsparse convert`` / ``train`` output)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    new_tokens: int = 64  # tokens each timed decode generates
    prompt_tokens: int = 16  # prompt of the decode runs
    prefill: tuple[int, ...] = (128, 512)
    repeats: int = 3  # timed runs per figure (median)
    compile: bool = True
    hf_reference: bool = True
    copy_megabytes: int = 1024  # bandwidth buffer; far beyond the caches
    threads: int = 2
    linears: str = "gemv"  # FastDecoder's linear layers for every variant
    torch_linears: bool = True  # also time the dense model with linears="torch" (torch's own F.linear)


class NoMLP(nn.Module):
    """Stands in for an MLP block to time the rest of the model: zeros of the block's output shape."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def without_mlps_(model: nn.Module) -> int:
    """Replace every feed-forward block of ``model`` (MLP or tree) by ``NoMLP``; returns how many."""
    from ..mlps import find_mlps
    from ..tree import TreeFF

    blocks = find_mlps(model)
    trees = [name for name, m in model.named_modules() if isinstance(m, TreeFF)]
    if not blocks and not trees:
        raise ValueError(f"{type(model).__name__} has no MLP blocks to time apart")
    for block in blocks.values():
        block.replace(NoMLP())
    for name in trees:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, NoMLP())
    return len(blocks) + len(trees)


# ------------------------------------------------------------------------------------------ measuring
def copy_gbps(megabytes: int) -> float:
    """Copy bandwidth, read + write bytes per second (the median of three copies)."""
    n = megabytes * (1 << 20) // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


def read_gbps(megabytes: int) -> float:
    """Read bandwidth (a sum over the buffer), the rate a weight-streaming matvec could reach at best."""
    n = megabytes * (1 << 20) // 4
    src = torch.randn(n)
    src.sum()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t0)
    return n * 4 / statistics.median(times) / 1e9


def prompt_ids(model_dir: str, n: int, vocab: int) -> torch.Tensor:
    """(1, n) token ids: held-out Shakespeare (Macbeth) through the model's tokenizer, or, for a model
    without one (or without the corpus), fixed pseudo-random ids."""
    from ..lm.convert import load_tokenizer_if_any

    tok = load_tokenizer_if_any(model_dir)
    if tok is not None:
        try:
            from ..data.shakespeare import markdown_to_text, play_files

            text = markdown_to_text(play_files()["macbeth"].read_text())
            ids = tok(text, return_tensors="pt").input_ids[:, :n]
            if ids.shape[1] == n:
                return ids
        except (FileNotFoundError, KeyError):
            pass
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, n), generator=g)


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        times.append(fn())
    return statistics.median(times)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measured_densities(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Share of each sparse block's neurons one decode token computes, block name -> fraction: an eager
    greedy run with the blocks' usage tracking on (tracking turns counts into Python numbers, which a
    compiled graph cannot), less the same prompt's prefill."""
    from ..decode import FastDecoder
    from ..sparse_ff import sparse_ff_blocks

    blocks = sparse_ff_blocks(model)
    if not blocks:
        return {}
    dec = FastDecoder(model, prompt.shape[1] + new_tokens, compile=False)
    dec.warm_up(prompt.shape[1])  # untracked

    def tracked(fn):
        for b in blocks.values():
            b.reset_usage()
            b.track_usage(True)
        try:
            fn()
        finally:
            for b in blocks.values():
                b.track_usage(False)
        return {n: b.measured_usage() for n, b in blocks.items()}

    pre = tracked(lambda: dec.prefill(prompt))
    gen = tracked(lambda: dec.generate(prompt, new_tokens, eos_token_id=None))
    for b in blocks.values():
        b.reset_usage()
    out = {}
    for n in blocks:
        tokens = gen[n].tokens - pre[n].tokens
        if tokens > 0:
            units = gen[n].active_fraction * gen[n].tokens - pre[n].active_fraction * pre[n].tokens
            out[n] = units / tokens
    return out


def _agree(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading generated tokens two outputs share."""
    n = min(a.shape[1], b.shape[1])
    diff = (a[0, :n] != b[0, :n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


class _Variant:
    """One model to measure: its name, how to build it, and whether HF's generate runs it as reference."""

    def __init__(self, name: str, kind: str, path: str | None = None):
        self.name, self.kind, self.path = name, kind, path  # path: the gates (sparse) or the model (converted)


def _build(settings: GenerateSettings, variant: _Variant, dtype: str) -> nn.Module:
    from ..decode import cast_weights_
    from ..lm.convert import load_model

    model = load_model(variant.path if variant.kind == "converted" else settings.model).eval()
    if variant.kind == "no_mlp":
        without_mlps_(model)
    elif variant.kind == "sparse":  # the gates on --model itself (they are checked to fit it)
        from ..gating import load_gates

        load_gates(model, variant.path)
    return cast_weights_(model, dtype)


def _fast_row(settings, variant, dtype, model, prompt, prefill_prompts, log, linears: str) -> dict:
    from ..decode import FastDecoder, weight_traffic

    density = measured_densities(model, prompt, settings.new_tokens)
    traffic = weight_traffic(model, density)
    # two decoders, each with the cache it needs: attention reads every slot of it at every step
    dec = FastDecoder(model, settings.prompt_tokens + settings.new_tokens, compile=settings.compile,
                      compile_prefill=False, linears=linears, warn=log)
    dec.warm_up(settings.prompt_tokens)
    pre = FastDecoder(model, max(settings.prefill), compile=settings.compile, compile_decode=False,
                      linears=linears, warn=log)
    for ids in prefill_prompts.values():
        pre.prefill(ids)  # each prompt length compiles its graph here, outside the timings
    n = settings.new_tokens
    out = dec.generate(prompt, n, eos_token_id=None)
    bw = copy_gbps(settings.copy_megabytes)
    rd = read_gbps(settings.copy_megabytes)

    def decode_s():
        dec.generate(prompt, n, eos_token_id=None)
        return dec.timing["decode_s"] / dec.timing["decode_tokens"]

    per_token = _median(decode_s, settings.repeats)
    prefill = {}
    for p, ids in prefill_prompts.items():
        prefill[p] = _median(lambda ids=ids: _timed(lambda: pre.prefill(ids)), settings.repeats)
    compiled = (dec.compiled["decode"], pre.compiled["prefill"])
    path = {(True, True): "compiled", (False, False): "eager", (True, False): "compiled decode, eager prefill",
            (False, True): "eager decode, compiled prefill"}[compiled]
    return {
        "variant": variant.name, "dtype": dtype, "path": path + (", torch linears" if linears == "torch" else ""),
        "linears": linears,
        "decode_s_per_token": per_token, "prefill_s": prefill, "tokens": out,
        "compile_s": {"decode": dec.compile_seconds["decode"], "prefill": pre.compile_seconds["prefill"],
                      "prefill_per_length": {str(k): v for k, v in pre.prefill_graphs.items()}},
        "fallback": {**dec.fallback, **pre.fallback},
        "weight_bytes_per_token": traffic.total, "mlp_bytes_per_token": traffic.mlp,
        "traffic_notes": traffic.notes, "kv_bytes_per_step": dec.static.kv_bytes,
        "copy_gbps": bw, "read_gbps": rd,
        "mlp_active_fraction": statistics.mean(density.values()) if density else None,
    }


def _hf_row(settings, variant, dtype, model, prompt, prefill_prompts) -> dict:
    n = settings.new_tokens

    def gen(ids, k):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                  pad_token_id=getattr(model.generation_config, "pad_token_id", None) or 0)

    out = gen(prompt, n)
    full = _median(lambda: _timed(lambda: gen(prompt, n)), settings.repeats)
    first = _median(lambda: _timed(lambda: gen(prompt, 1)), settings.repeats)
    prefill = {p: _median(lambda ids=ids: _timed(lambda: gen(ids, 1)), settings.repeats)
               for p, ids in prefill_prompts.items()}
    return {"variant": variant.name, "dtype": dtype, "path": "hf-generate (eager)",
            "decode_s_per_token": max(full - first, 1e-9) / (n - 1), "prefill_s": prefill, "tokens": out}


def _derive(rows: list[dict]) -> None:
    """MLP time (full - no-MLP, same path and dtype), bandwidth use, speed-ups and their byte limits."""
    def find(dtype, path, kind):
        return next((r for r in rows if r["dtype"] == dtype and r["path"] == path and r["_kind"] == kind), None)

    for r in rows:
        r["decode_tokens_per_s"] = 1.0 / r["decode_s_per_token"]
        r["prefill_tokens_per_s"] = {str(p): p / t for p, t in r["prefill_s"].items()}
        nomlp = find(r["dtype"], r["path"], "no_mlp")
        if nomlp is not None and r["_kind"] != "no_mlp":
            r["decode_other_s_per_token"] = nomlp["decode_s_per_token"]
            r["decode_mlp_s_per_token"] = r["decode_s_per_token"] - nomlp["decode_s_per_token"]
            r["decode_mlp_share"] = r["decode_mlp_s_per_token"] / r["decode_s_per_token"]
            r["prefill_mlp_share"] = {str(p): (t - nomlp["prefill_s"][p]) / t for p, t in r["prefill_s"].items()
                                      if p in nomlp["prefill_s"]}
        if "weight_bytes_per_token" in r:
            b = r["weight_bytes_per_token"]
            r["achieved_gbps"] = b * r["decode_tokens_per_s"] / 1e9
            r["copy_bandwidth_fraction"] = r["achieved_gbps"] / r["copy_gbps"]
            r["read_bandwidth_fraction"] = r["achieved_gbps"] / r["read_gbps"]
            r["limit_tokens_per_s"] = r["copy_gbps"] * 1e9 / b
        dense = find(r["dtype"], r["path"], "dense")
        if r["_kind"] == "dense" and "weight_bytes_per_token" in r:
            r["target"] = f"copy bandwidth fraction >= {DENSE_TARGET}"
            r["met"] = r["copy_bandwidth_fraction"] >= DENSE_TARGET
        if r["_kind"] in ("sparse", "converted") and dense is not None:
            r["speedup_vs_dense"] = dense["decode_s_per_token"] / r["decode_s_per_token"]
            r["allowed_speedup"] = dense["weight_bytes_per_token"] / r["weight_bytes_per_token"]
            r["share_of_allowed_speedup"] = r["speedup_vs_dense"] / r["allowed_speedup"]
            r["target"] = f"share of allowed speed-up >= {SPARSE_TARGET}"
            r["met"] = r["share_of_allowed_speedup"] >= SPARSE_TARGET
        hf = find(r["dtype"], "hf-generate (eager)", r["_kind"]) if r["path"] != "hf-generate (eager)" else None
        if hf is not None:
            n = r["_new"]  # generated tokens the two paths share from the start
            r["agrees_with_hf_tokens"] = _agree(r["tokens"][:, -n:], hf["tokens"][:, -n:])
            r["speedup_vs_hf"] = hf["decode_s_per_token"] / r["decode_s_per_token"]
    for r in rows:
        r["kind"] = r.pop("_kind")
        r.pop("tokens")
        r.pop("_new")
        r["prefill_s"] = {str(p): t for p, t in r["prefill_s"].items()}


def run_generate(settings: GenerateSettings, log=print) -> dict:
    """Measure every variant in every dtype (see the module doc); returns one JSON-ready dict."""
    from ..ops._numba import sync_threads

    torch.set_num_threads(settings.threads)
    sync_threads()
    start = time.perf_counter()
    load_start = os.getloadavg()
    variants = [_Variant("dense", "dense"), _Variant("no MLP (timing only)", "no_mlp")]
    for path in settings.sparsify:
        gates_name = Path(path).name
        variants.append(_Variant(f"sparse: {gates_name}", "sparse", path))
    for path in settings.converted:
        variants.append(_Variant(f"converted: {Path(path).name}", "converted", path))
    from ..lm.convert import load_model

    probe = load_model(settings.model)
    vocab = probe.get_input_embeddings().weight.shape[0]
    del probe
    prompt = prompt_ids(settings.model, settings.prompt_tokens, vocab)
    longest = prompt_ids(settings.model, max(settings.prefill, default=1), vocab)
    prefill_prompts = {p: longest[:, :p].contiguous() for p in settings.prefill}
    rows = []
    for dtype in settings.dtypes:
        for v in variants:
            log(f"{dtype} {v.name}: loading, compiling and timing")
            model = _build(settings, v, dtype)
            row = _fast_row(settings, v, dtype, model, prompt, prefill_prompts, log, settings.linears)
            rows.append(row | {"_kind": v.kind, "_new": settings.new_tokens})
            torch._dynamo.reset()  # the next variant compiles afresh (and the recompile limit never binds)
            if settings.torch_linears and settings.linears != "torch" and v.kind == "dense":
                log(f"{dtype} {v.name}: the same with torch linears")
                plain = _build(settings, v, dtype)
                rows.append(_fast_row(settings, v, dtype, plain, prompt, prefill_prompts, log, "torch")
                            | {"_kind": v.kind, "_new": settings.new_tokens})
                torch._dynamo.reset()
                del plain
            if settings.hf_reference and v.kind in ("dense", "no_mlp"):
                log(f"{dtype} {v.name}: HF generate (eager)")
                rows.append(_hf_row(settings, v, dtype, model, prompt, prefill_prompts)
                            | {"_kind": v.kind, "_new": settings.new_tokens})
            del model
    _derive(rows)
    machine = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
    }
    return {"machine": machine, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in settings.__dict__.items()},
            "rows": rows, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------- printing
def print_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=240)
    m = report["machine"]
    table = Table(title=f"dynsparse bench generate: {Path(report['settings']['model']).name} on {m['cpu']}, "
                        f"{m['threads']} threads, batch 1, greedy")
    cols = ("variant", "dtype", "path", "decode tok/s", "ms/tok", "MLP ms", "other ms", "MLP share", "MB/tok",
            "GB/s", "of copy bw", "limit tok/s", "speed-up", "allowed", "of allowed")
    prefills = report["settings"]["prefill"]
    cols += tuple(f"prefill {p} tok/s" for p in prefills) + ("compile s",)
    for c in cols:
        table.add_column(c, justify="left" if c in ("variant", "dtype", "path") else "right")

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in report["rows"]:
        compile_s = r.get("compile_s")
        table.add_row(
            r["variant"], r["dtype"], r["path"], f(r["decode_tokens_per_s"], ".1f"), f(r["decode_s_per_token"] * 1e3, ".1f"),
            f(r.get("decode_mlp_s_per_token", None) and r["decode_mlp_s_per_token"] * 1e3, ".1f"),
            f(r.get("decode_other_s_per_token", None) and r["decode_other_s_per_token"] * 1e3, ".1f"),
            f(r.get("decode_mlp_share"), ".0%"), f(r.get("weight_bytes_per_token", None) and r["weight_bytes_per_token"] / 1e6, ".0f"),
            f(r.get("achieved_gbps"), ".1f"), f(r.get("copy_bandwidth_fraction"), ".0%"), f(r.get("limit_tokens_per_s"), ".1f"),
            f(r.get("speedup_vs_dense"), ".2f"), f(r.get("allowed_speedup"), ".2f"), f(r.get("share_of_allowed_speedup"), ".0%"),
            *(f(r["prefill_tokens_per_s"].get(str(p)), ".0f") for p in prefills),
            "" if not compile_s else f"{compile_s['decode']:.0f}+{compile_s['prefill']:.0f}",
        )
    console.print(table)
    bw = [r["copy_gbps"] for r in report["rows"] if "copy_gbps" in r]
    rd = [r["read_gbps"] for r in report["rows"] if "read_gbps" in r]
    if bw:
        console.print(f"copy bandwidth {min(bw):.1f}-{max(bw):.1f} GB/s (read+write bytes, {report['settings']['copy_megabytes']} MB "
                      f"buffers, measured before each row), read bandwidth {min(rd):.1f}-{max(rd):.1f} GB/s; "
                      f"load average {m['load_average_start'][0]:.2f} at the start, {m['load_average_end'][0]:.2f} at the end "
                      f"on {m['cores']} cores; {report['seconds']:.0f} s")
    for r in report["rows"]:
        if r.get("fallback"):
            console.print(f"[yellow]{r['dtype']} {r['variant']}: ran eagerly where compile failed: {r['fallback']}[/yellow]")
        if r.get("traffic_notes"):
            console.print(f"[yellow]{r['dtype']} {r['variant']}: bytes are upper bounds for {r['traffic_notes']}[/yellow]")


def to_markdown(report: dict) -> str:
    """The report's table as markdown (for docs/results), with the machine line under it."""
    prefills = [str(p) for p in report["settings"]["prefill"]]
    head = ["variant", "dtype", "path", "decode tok/s", "ms/token", "MLP ms", "other ms", "MLP share", "weight MB/token",
            "GB/s", "of copy bw", "limit tok/s", "speed-up", "allowed", "of allowed"]
    head += [f"prefill {p} tok/s" for p in prefills] + [f"prefill {prefills[-1]} MLP share", "compile s (decode+prefill)"]

    def f(v, fmt, scale=1.0):
        return "" if v is None else format(v * scale, fmt)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        c = r.get("compile_s")
        cells = [r["variant"], r["dtype"], r["path"], f(r["decode_tokens_per_s"], ".1f"), f(r["decode_s_per_token"], ".1f", 1e3),
                 f(r.get("decode_mlp_s_per_token"), ".1f", 1e3), f(r.get("decode_other_s_per_token"), ".1f", 1e3),
                 f(r.get("decode_mlp_share"), ".0%"), f(r.get("weight_bytes_per_token"), ".0f", 1e-6),
                 f(r.get("achieved_gbps"), ".2f"), f(r.get("copy_bandwidth_fraction"), ".0%"),
                 f(r.get("limit_tokens_per_s"), ".1f"), f(r.get("speedup_vs_dense"), ".2f"), f(r.get("allowed_speedup"), ".2f"),
                 f(r.get("share_of_allowed_speedup"), ".0%")]
        cells += [f(r["prefill_tokens_per_s"].get(p), ".0f") for p in prefills]
        cells += [f(r.get("prefill_mlp_share", {}).get(prefills[-1]), ".0%"),
                  "" if not c or r["path"] == "eager" else f"{c['decode']:.0f}+{c['prefill']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    bw = [r["copy_gbps"] for r in report["rows"] if "copy_gbps" in r]
    rd = [r["read_gbps"] for r in report["rows"] if "read_gbps" in r]
    lines.append("")
    lines.append(f"{m['cpu']}, {m['threads']} threads, {m['cores']} cores, torch {m['torch']}, OMP_WAIT_POLICY "
                 f"{m['omp_wait_policy']}; copy bandwidth {min(bw):.1f}-{max(bw):.1f} GB/s and read bandwidth "
                 f"{min(rd):.1f}-{max(rd):.1f} GB/s ({report['settings']['copy_megabytes']} MB buffers, measured before "
                 f"each fast row); load average (1/5/15 min) {', '.join(f'{x:.2f}' for x in m['load_average_start'])} at "
                 f"the start, {', '.join(f'{x:.2f}' for x in m['load_average_end'])} at the end; {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"
