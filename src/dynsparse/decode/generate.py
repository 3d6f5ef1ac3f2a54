"""``FastDecoder``: greedy generation at batch 1 over a static KV cache, prefill and decode step compiled apart.

The decode step sees tensors of one shape at every position, so it compiles once. Prefill compiles one
static graph per prompt length, up to ``PREFILL_GRAPHS`` lengths (later lengths run eagerly): a graph
symbolic in the length would serve them all, but inductor takes far longer to build it for a real model
(over a quarter of an hour for a 30-layer Llama on two cores, against about a minute per static length).
A one-token prompt runs the decode step. ``fullgraph=True``: a graph break (anything the compiler cannot
trace, a dynsparse op included) is a compile error, not a silent slow path. The first call of each graph
compiles it (``warm_up`` does the decode step's); when compiling fails, that step runs eagerly from then
on and ``fallback`` says why.
"""
from __future__ import annotations

import contextlib
import sys
import time

import torch
from torch import nn

from .adapters import static_model
from .linears import gemv_active, route_linears_

_MODEL_DEFAULT = object()
PREFILL_GRAPHS = 4  # prompt lengths that get a compiled prefill graph (dynamo's recompile limit is 8)
LINEARS = ("torch", "gemv")


def _decode_step(static, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    return static.forward(token, position).argmax(-1)


def _prefill_step(static, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return static.forward(ids, positions).argmax(-1)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


class FastDecoder:
    """Greedy decoding of ``model`` (eval mode, batch 1) for sequences of up to ``max_len`` positions.

    ``compile``: compile the decode step (``compile_decode``) and the prefill (``compile_prefill``) with
    ``torch.compile`` (``mode``: None, the default, keeps compile time short; "max-autotune-no-cudagraphs"
    searches kernels). Attention reads all ``max_len`` cache slots at every step, so a tight ``max_len``
    is a faster decoder.
    ``linears``: "gemv" (default) runs the model's ``nn.Linear`` layers through ``dynsparse::gemv`` while
    decoding (``decode.linears``; the model is otherwise unchanged; on CPU its C++ kernel reads each weight
    row once, where torch's BLAS call at one token reads well below memory speed); "torch" leaves them on
    ``F.linear``. ``dynsparse bench generate`` times both.
    ``warn``: where the one-line fallback message goes (default: stderr).
    """

    def __init__(self, model: nn.Module, max_len: int, *, compile: bool = True, compile_decode: bool = True,
                 compile_prefill: bool = True, mode: str | None = None, linears: str = "gemv", warn=None):
        if linears not in LINEARS:
            raise ValueError(f"linears must be one of {list(LINEARS)}, got {linears!r}")
        self.model = model.eval()
        self.linears = linears
        if linears == "gemv":
            route_linears_(model)
        self.static = static_model(model, max_len)
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self._warn = warn or (lambda msg: print(msg, file=sys.stderr))
        self.compiled = {"decode": compile and compile_decode, "prefill": compile and compile_prefill}
        self._fns = {"decode": _decode_step, "prefill": _prefill_step}
        if self.compiled["decode"]:
            # dynamic=None: the step's shapes never change, but int attributes that do (GatedMLP's counters)
            # become graph inputs after one recompile instead of a recompile per token
            self._fns["decode"] = torch.compile(_decode_step, fullgraph=True, dynamic=None, mode=mode)
        if self.compiled["prefill"]:
            # the same for the counters; the prompt length stays static (``_run`` marks it): a graph per length
            self._fns["prefill"] = torch.compile(_prefill_step, fullgraph=True, dynamic=None, mode=mode)
        self.compile_seconds = {"decode": 0.0, "prefill": 0.0}  # first calls, compilation included
        self.prefill_graphs: dict[int, float] = {}  # prompt length -> seconds of its first (compiling) call
        self.fallback: dict[str, str] = {}  # step -> why it runs eagerly
        self.timing: dict[str, float] = {}  # of the last generate(): prefill_s, decode_s, decode_tokens
        self._warm = False

    # ----------------------------------------------------------------------------------------- steps
    def _run(self, kind: str, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # GatedMLP counts its computed neurons in int attributes; as constants of the graph they would fail
        # a guard (and recompile) at every step, so they may become graph inputs
        # (set and restored by hand: config.patch costs a few hundred microseconds per call)
        config = torch._dynamo.config
        before = config.allow_unspec_int_on_nn_module
        config.allow_unspec_int_on_nn_module = True
        if kind == "prefill":
            torch._dynamo.mark_static(ids, 1)
            torch._dynamo.mark_static(positions, 0)
        try:
            with torch.no_grad(), self._linears():
                return self._fns[kind](self.static, ids, positions)
        finally:
            config.allow_unspec_int_on_nn_module = before

    def _first_call(self, kind: str, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Run a step whose graph may not be compiled yet; returns (output, seconds)."""
        t0 = time.perf_counter()
        try:
            out = self._run(kind, ids, positions)
        except Exception as e:  # noqa: BLE001 - dynamo, inductor and the C++ compiler raise many types
            if not self.compiled[kind]:
                raise
            self.compiled[kind] = False
            self._fns[kind] = _decode_step if kind == "decode" else _prefill_step
            self.fallback[kind] = _one_line(e)
            self._warn(f"dynsparse decode: torch.compile of the {kind} step failed, running it eagerly "
                       f"({self.fallback[kind]})")
            self.static.reset()
            out = self._run(kind, ids, positions)
        return out, time.perf_counter() - t0

    def warm_up(self, prompt_len: int | None = None) -> None:
        """Compile (or fall back) the decode step, and the prefill of ``prompt_len`` tokens if given, on
        dummy tokens; the cache is reset afterwards."""
        # the decode step's inputs exactly as generate() passes them (strides included: no recompile)
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        at = 2 if prompt_len is None else max(2, min(prompt_len, self.max_len - 2))
        self.static.reset()
        seconds = 0.0
        # a second step: where int attributes changed (counters), this is the one recompile that makes them inputs
        for p in (at, at + 1):
            seconds += self._first_call("decode", token[:, None], torch.full((1,), p, device=self.device))[1]
        self.compile_seconds["decode"] = seconds
        self._warm = True
        if prompt_len is not None and prompt_len >= 2:
            self.prefill(torch.zeros(1, prompt_len, dtype=torch.long, device=self.device))
        self.static.reset()

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache, run the prompt (1, P); returns the first generated token, shape (1,)."""
        self._check_ids(input_ids)
        if not self._warm:
            self.warm_up()
        self.static.reset()
        n = input_ids.shape[1]
        positions = torch.arange(n, device=self.device)
        if n == 1:
            return self._run("decode", input_ids, positions)
        if not self.compiled["prefill"] or n in self.prefill_graphs:
            return self._run("prefill", input_ids, positions)
        if len(self.prefill_graphs) >= PREFILL_GRAPHS:  # no more graphs: this length runs eagerly
            with torch.no_grad(), self._linears():
                return _prefill_step(self.static, input_ids, positions)
        out, seconds = self._first_call("prefill", input_ids, positions)
        if self.compiled["prefill"]:  # a second call: where int attributes changed, the one recompile
            self.static.reset()
            seconds += self._first_call("prefill", input_ids, positions)[1]
            self.prefill_graphs[n] = seconds
            self.compile_seconds["prefill"] = sum(self.prefill_graphs.values())
        return out

    # -------------------------------------------------------------------------------------- generate
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=_MODEL_DEFAULT) -> torch.Tensor:
        """(1, P + n) token ids, greedy, like ``model.generate(input_ids, max_new_tokens=..., do_sample=False)``:
        stops after an end token (``eos_token_id``: an id, a list, None for never; default: the model's
        generation config) or after ``max_new_tokens``."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self._check_ids(input_ids)
        n = input_ids.shape[1]
        if n + max_new_tokens - 1 > self.max_len:
            raise ValueError(f"a prompt of {n} tokens plus max_new_tokens={max_new_tokens} needs "
                             f"{n + max_new_tokens - 1} cache positions; this decoder holds max_len={self.max_len}")
        stop = self._eos_set(eos_token_id)
        if not self._warm:
            self.warm_up(n)
        if n > 1 and self.compiled["prefill"] and n not in self.prefill_graphs:
            self.prefill(input_ids)  # compile this length's graph outside the timed part
        t0 = time.perf_counter()
        token = self.prefill(input_ids)
        t1 = time.perf_counter()
        out = [token]
        position = torch.empty(1, dtype=torch.long, device=self.device)
        for p in range(n, n + max_new_tokens - 1):
            if stop and int(token) in stop:
                break
            position.fill_(p)
            token = self._run("decode", token[:, None], position)
            out.append(token)
        t2 = time.perf_counter()
        self.timing = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens": len(out) - 1}
        return torch.cat([input_ids, torch.stack(out, dim=1).to(input_ids.dtype)], dim=1)

    def _linears(self):
        return gemv_active() if self.linears == "gemv" else contextlib.nullcontext()

    def _check_ids(self, input_ids) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
                or input_ids.is_floating_point() or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be an integer tensor of shape (1, P) with P >= 1 (batch 1), got "
                             f"{tuple(getattr(input_ids, 'shape', ()))} {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.shape[1] > self.max_len:
            raise ValueError(f"input_ids holds {input_ids.shape[1]} tokens, more than max_len={self.max_len}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device}, the model on {self.device}")

    def _eos_set(self, eos_token_id) -> set[int]:
        if eos_token_id is _MODEL_DEFAULT:
            config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(config, "eos_token_id", None)
        if eos_token_id is None:
            return set()
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
        return set(ids)
