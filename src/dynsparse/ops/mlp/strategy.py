"""Which form of the sparse MLP to run for a batch's lists when the caller says ``strategy="auto"``."""
from __future__ import annotations

import torch

# Union path vs per-token path: the union runs dense BLAS over |union| rows for every token, the
# per-token path does nnz dot+axpy pairs at a lower rate. Union wins when M * |union| < UNION_SPEEDUP * nnz,
# i.e. when the tokens' lists overlap by more than 1/UNION_SPEEDUP. Measured with ``dynsparse bench mgs``
# (256-2048-256, 10 % per token, 2 threads, idle AMD EPYC): at 256 and 850 tokens the union is 2.0x faster
# at full overlap, 1.2x at 0.4 and 0.5-0.6x at 0.2, so the break-even sits near 0.3; at 64 tokens its fixed
# costs (gathering the union's rows) push break-even to ~0.7, hence the minimum batch.
UNION_SPEEDUP = 3.0
UNION_MIN_TOKENS = 128


def choose_strategy(m: int, indices: torch.Tensor, d_ff: int, backend: str) -> str:
    """"token" or "union" for m tokens' neuron lists on a concrete backend.

    The rule above was measured on the numba kernels. The torch per-token form gathers an (nnz, d)
    tensor, so torch always takes the union's dense matmuls (as the numba-less fallback always did);
    the reference computes everything either way; Triton's kernel reads both forms' lists alike, so
    it takes them as they are (counting the union would cost a device synchronisation).
    """
    if backend == "torch":
        return "union"
    if backend != "numba":
        return "token"
    nnz = indices.numel()
    if nnz == 0 or m < UNION_MIN_TOKENS:
        return "token"
    union = int(torch.bincount(indices.long(), minlength=d_ff).count_nonzero())
    return "union" if m * union < UNION_SPEEDUP * nnz else "token"
