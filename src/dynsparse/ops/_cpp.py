"""The ``cpp`` backend's build: dynsparse's C++ CPU kernels, compiled once per machine and registered as
``dynsparse_cpp::*`` torch ops.

Why C++ beside numba: a decode step makes about 200 small op calls. numba's path (argument checks, numpy
views, ``from_numpy``, its own dispatch) costs tens of microseconds a call, as much as the kernel at one
token; a registered C++ op costs a few, and inside a compiled graph inductor calls it with no Python at
all. The kernels split their work with ``at::parallel_for``, so they run on torch's own OpenMP threads.

torch's extension builder (g++ and ninja) compiles the sources at the first call, with ``-march=native``
(the build directory is named by the CPU, so a shared home never hands one machine another's binary),
and caches the result under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later
processes load it in well under a second. Where the build fails, ``cpp_available()`` is False, ``auto``
picks the next backend and an explicit ``backend="cpp"`` names the reason in one line.
"""
from __future__ import annotations

import functools
import hashlib
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "dense" / "gemv.cpp", HERE / "mlp" / "gate_skip.cpp", HERE / "mlp" / "lowbit_gate.cpp",
           HERE / "tree" / "tree_infer.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp")


def _cpu_tag() -> str:
    """A short name for this CPU's model and instruction sets (what -march=native compiled for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha1("\n".join(lines + [platform.machine()]).encode()).hexdigest()[:10]


@functools.cache
def _build() -> str:
    """Build (or load the cached build of) the kernels; "" when they are registered, else why not."""
    from torch.utils import cpp_extension

    reason = ""
    if not cpp_extension.is_ninja_available():
        reason = "the C++ kernels need ninja to build: pip install ninja"
    else:
        name = f"dynsparse_cpp_{_cpu_tag()}"
        if not _cached(cpp_extension, name):
            print("dynsparse: building the C++ CPU kernels (once per machine, about a minute) ...",
                  file=sys.stderr, flush=True)
        try:
            cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=list(FLAGS),
                               extra_ldflags=["-fopenmp"], extra_include_paths=[str(HERE)], is_python_module=False,
                               verbose=False)
        except Exception as e:  # a missing compiler, a failed build: the backend is unavailable, not the package
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
            reason = f"the C++ kernels did not build: {lines[-1][:300]}"
    if reason:
        print(f"dynsparse: {reason}; backend 'auto' uses numba instead", file=sys.stderr, flush=True)
        return reason
    _register_fakes()
    return ""


def _cached(cpp_extension, name: str) -> bool:
    """Whether a build of ``name`` is already on disk (then loading it takes well under a second)."""
    try:
        return (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch's: without it, only the first-build notice is lost
        return True


@torch.compiler.assume_constant_result
def build_status() -> str:
    """"" where the kernels are registered, else why not (builds them on the first call). A constant to
    torch.compile, which calls it once while tracing instead of tracing the build."""
    return _build()


def cpp_available() -> bool:
    """Whether the ``cpp`` backend can run here."""
    return not build_status()


def require_cpp() -> None:
    """Refuse the ``cpp`` backend in one line where its kernels are unavailable."""
    reason = build_status()
    if reason:
        raise RuntimeError(f"backend 'cpp' is unavailable: {reason}")


_fakes_registered = False


def _register_fakes() -> None:
    """Shapes for torch.compile, so compiled graphs keep the C++ ops as single nodes (once per process: a
    cleared build cache loads the kernels again, and a second registration would be refused)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("dynsparse_cpp::gemv")
    def _(x, w, b, act_code):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("dynsparse_cpp::gate_skip_mlp")
    def _(x, w1, b1, w2_t, b2, wg, bg, offset, threshold, act_code):
        return x.new_empty(x.shape[0], w2_t.shape[1])

    @torch.library.register_fake("dynsparse_cpp::tree_infer")
    def _(x, w_in, b_in, w_out, depth, act_code, act_on_path):
        return x.new_empty(x.shape[0], w_out.shape[-1]), x.new_empty(x.shape[0], w_in.shape[0], dtype=torch.int64)

    @torch.library.register_fake("dynsparse_cpp::lowbit_gate_mlp")
    def _(x, route_codes, route_scale, route_lo, up_codes, up_scale, up_lo, in_scale, w2_norm, b_route, b_up,
          w1, b1, w2_t, b2, wg, bg, offset, threshold, act_code):
        return x.new_empty(x.shape[0], w2_t.shape[1])
