"""The gate-skip C++ kernel's software prefetch, swept: how far ahead, how much of each row, which hint.

    python experiments/gate_skip_prefetch.py TAG AHEAD LINES HINT THREADS

Builds a copy of ``ops/mlp/gate_skip.cpp`` with the kept rows of the neuron AHEAD steps on prefetched
(their first LINES cache lines, locality HINT 0-3) and times the 30 SmolLM2 MLP blocks at one token, CATS at
30 and 50 % (thresholds set on that token), median of 30 passes. One variant per process (each registers the
same op names). A tuning sweep behind one constant of the kernel, not a benchmark of record."""
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

OPS = pathlib.Path(__file__).resolve().parents[1] / "src" / "dynsparse" / "ops"


def main() -> None:
    tag, ahead, lines, hint, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    src = (OPS / "mlp" / "gate_skip.cpp").read_text()
    for old, new in (("constexpr int64_t AHEAD = 2;", f"constexpr int64_t AHEAD = {ahead};"),
                     ("b < n * static_cast<int64_t>(sizeof(W));", f"b < std::min<int64_t>({lines} * 64, n * sizeof(W));"),
                     ("__builtin_prefetch(p + b, 0, 1)", f"__builtin_prefetch(p + b, 0, {hint})")):
        assert old in src, old
        src = src.replace(old, new)
    build = pathlib.Path(cpp_extension.get_default_build_root()) / f"gate_skip_sweep_{tag}"
    build.mkdir(parents=True, exist_ok=True)
    (build / "gate_skip.cpp").write_text(src)
    cpp_extension.load(name=f"gate_skip_sweep_{tag}", sources=[str(build / "gate_skip.cpp")],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       extra_include_paths=[str(OPS)], is_python_module=False)
    from dynsparse.lm.convert import load_model
    from dynsparse.lm.pretrained import resolve_model

    torch.set_num_threads(threads)
    blocks = [layer.mlp for layer in load_model(str(resolve_model("smollm2-135m"))).eval().model.layers]
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(0))
    weights = [(b.up_proj.weight, b.down_proj.weight.t().contiguous(), b.gate_proj.weight) for b in blocks]
    out = {}
    for sparsity in (0.3, 0.5):
        thresholds = [torch.quantile(F.silu(F.linear(x, b.gate_proj.weight)).abs(), sparsity) for b in blocks]

        def run():
            for (w1, w2_t, wg), t in zip(weights, thresholds):
                torch.ops.dynsparse_cpp.gate_skip_mlp(x, w1, None, w2_t, None, wg, None, None, t, 2)

        run()
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        out[f"{sparsity:.0%}"] = round(1e3 * float(np.median(times)), 2)
    print(tag, f"ahead={ahead} lines={lines} hint={hint} threads={threads}", out, "ms")


if __name__ == "__main__":
    main()
