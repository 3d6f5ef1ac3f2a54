"""Run benchmark suites: machine peaks first, then the cases, all in one process and thread count."""
from __future__ import annotations

import os
import time

import torch

from ..ops.backend import numba_available
from ..ops._numba import sync_threads
from .yardstick import gather_ceiling_gflops
from .cases import SUITES, Settings
from .timing import cpu_name, matmul_gflops, memory_gbps


def run_suites(names: list[str], settings: Settings | None = None, on_result=None) -> dict:
    """Measure the machine, then every case of the named suites. ``on_result(result)`` is called as
    each case finishes (for live printing). Returns one JSON-ready dict."""
    s = settings or Settings()
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; choose from {sorted(SUITES)}")
    sync_threads()  # numba kernels use torch's thread count
    start = time.perf_counter()
    machine = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        # other processes' load skews every timing (both sides alike, but multi-threaded runs most)
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "torch": torch.__version__,
        "numba": numba_available(),
        "matmul_gflops": matmul_gflops(s.peak_matmul_n),
        "memory_gbps": memory_gbps(s.peak_megabytes),
        # the sparse kernels' own speed-of-light: numba dot + axpy on rows already in L1
        "gather_ceiling_gflops": gather_ceiling_gflops(torch.get_num_threads(), s.d_model),
    }
    results, errors = [], {}
    for name in names:
        try:
            for r in SUITES[name](s):
                results.append(r.to_dict() | {"suite": name})
                if on_result:
                    on_result(results[-1])
        except RuntimeError as e:  # a suite that cannot run here (e.g. no LM package) is reported, not hidden
            errors[name] = str(e)
    return {"machine": machine, "results": results, "errors": errors, "seconds": time.perf_counter() - start}
