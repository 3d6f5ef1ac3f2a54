"""Timing and the machine's own yardsticks: median wall time, matmul GFLOP/s, memory bandwidth."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def median_time(fn, warmup: int = 2, repeats: int = 5, min_time: float = 0.0) -> float:
    """Median wall-clock seconds of fn() after warm-up calls. Short calls are batched into loops of
    at least ``min_time`` seconds so that timer resolution and call jitter do not dominate."""
    for _ in range(warmup):
        fn()
    loops = 1
    if min_time > 0:
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-7)
        loops = max(1, int(min_time / once))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t0) / loops)
    return statistics.median(times)


def matmul_gflops(n: int = 1536, repeats: int = 3) -> float:
    """fp32 GEMM throughput (n x n x n) at torch's current thread count: the compute ceiling."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: a @ b, warmup=1, repeats=repeats)
    return 2 * n**3 / t / 1e9


def memory_gbps(megabytes: int = 256, repeats: int = 3) -> float:
    """Copy bandwidth (read + write bytes per second) of a buffer far larger than the caches."""
    n = megabytes * (1 << 20) // 4
    src, dst = torch.randn(n), torch.empty(n)
    t = median_time(lambda: dst.copy_(src), warmup=1, repeats=repeats)
    return 2 * n * 4 / t / 1e9


def cpu_name() -> str:
    """The CPU's model name (lscpu's 'Model name'), for the record."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
