"""A decode step compiled as one graph: what makes batch-1 decoding (chat, one user of the server)
fast on a CPU.

At batch 1 a step of the default model reads the weights once but also runs ~1,500 small
operations (norms, rotary embeddings, residual adds, cache writes; 2-5 us each plus the Python
around them): on the AVX2 machine first measured, ~20 ms of a 37 ms int8 token
(docs/BENCHMARKS.md). torch.compile (inductor) fuses those into a few generated C++ loops; the
weight products stay external calls (FBGEMM's through the operators of decode/quantize.py), and so
does the attention of the new token, csrc/one_query_attention.cpp's where our kernels are built
(PyTorch's SDPA spent ~60 us a layer on set-up: ~1 ms of a ~11 ms int8 token, 2026-12-06).

A graph is only reused while nothing it read changes, so the step is written to read no Python
value that moves from token to token: the KV cache keeps a fixed capacity, the new token's slot is
a tensor (`KVCache.write_slot`) and the mask comes from the cache's positions and validity by
tensor arithmetic (models/attention.py). The cache's capacity is marked dynamic, so one graph
serves every prompt length; compiling takes ~8 s with inductor's code cached on disk, ~60-100 s
the first time on a machine. A second batch size compiles once more (batch 1 is the case
this is for; the server's changing batches work, with a compile per new shape at first).

A family whose forward cannot be one graph (GPT-2 tests its positions with a Python `if`) is
compiled in pieces instead, still with the same tokens.

`enable(model)` attaches a `StaticStep` to the model; the engine's `Decoder` (generate.py) then
runs every one-token step through it, so chat, serve and generate need nothing else. Chat and
serve by default compile it in a background thread instead and answer eagerly meanwhile
(decode/background.py); the compiled code is kept on disk between starts (decode/compile_cache.py).
"""

from __future__ import annotations

import types

import torch

from instructkit.decode import native
from instructkit.decode.compile_cache import use_compile_cache
from instructkit.errors import UserError
from instructkit.models.attention import KVCache


class StaticStep:
    """logits (B, V) of one new token per row, written into a static-capacity cache.

    `batches`: None runs every batch size through the step (a new size compiles on its first
    call); a set of sizes runs only those through it and any other size eagerly, so a thread
    that decodes never stops for a compile (the background compile's choice)."""

    def __init__(self, model: torch.nn.Module, *, compile: bool = True, batches: frozenset[int] | None = None):
        self.model = model
        self.compiled = compile
        self.batches = batches
        self.graph_breaks = False
        if compile:
            use_compile_cache()
            self._forward = self._compiled(fullgraph=True)
        else:
            self._forward = self._step

    def _compiled(self, *, fullgraph: bool):
        step = types.MethodType(_own_copy(StaticStep._step), self)
        # cpp_wrapper: the graph's ~190 calls (126 weight products at batch 1) made from generated
        # C++, not Python: int4 --compile 87 against 74-82 tokens/s (2026-12-05); first compile
        # ~60-100 s instead of ~30 (inductor's disk cache makes later ones ~8 s).
        options = {"guard_filter_fn": _skip_model_guards, "cpp_wrapper": True}
        return torch.compile(step, fullgraph=fullgraph, options=options)

    def allow_graph_breaks(self) -> None:
        """Compile afresh, in pieces where the forward cannot be one graph (GPT-2 checks its
        positions against the context with a Python `if` on a tensor's value)."""
        self.graph_breaks = True
        self._forward = self._compiled(fullgraph=False)

    def freeze(self) -> None:
        """Run only what is compiled by now: a call the graphs do not cover (a shape never seen)
        runs this step's arithmetic eagerly instead of compiling on the caller's thread."""
        self._forward = torch._dynamo.run(self._forward)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        hidden = self.model(tokens, positions=positions, cache=cache, return_hidden=True)  # (B, 1, C)
        return self.model.head(hidden[:, -1])

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens and positions (B, 1) -> logits (B, V); advances the cache by one slot."""
        if self.batches is not None and tokens.shape[0] not in self.batches:
            return self._eager(tokens, positions, cache)
        if cache.length + 1 > cache.capacity:
            raise ValueError(f"KV cache full: {cache.length} + 1 > {cache.capacity}")
        if cache.write_slot is None:
            cache.write_slot = torch.zeros(1, dtype=torch.long, device=cache.positions.device)
            keys = cache.layers[0].keys
            cache.one_query_kernel = keys.device.type == "cpu" and keys.dtype == torch.float32 and native.available()
            if self.compiled:
                torch._dynamo.mark_dynamic(cache.positions, 1)
                torch._dynamo.mark_dynamic(cache.valid, 1)
                for layer in cache.layers:
                    torch._dynamo.mark_dynamic(layer.keys, 2)
                    torch._dynamo.mark_dynamic(layer.values, 2)
        cache.write_slot.fill_(cache.length)
        logits = self._forward(tokens, positions, cache)
        cache.length += 1
        return logits

    def _eager(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The engine's eager step (Decoder._forward without a static step): slots by
        `cache.length`, so a cache this step wrote at another batch size drops its slot tensor."""
        cache.write_slot = None
        hidden = self.model(tokens, positions=positions, cache=cache, return_hidden=True)  # (B, 1, C)
        return self.model.head(hidden[:, -1])


def _own_copy(function: types.FunctionType) -> types.FunctionType:
    """`function` with a code object of its own. Dynamo keeps compiled graphs per code object, so
    each StaticStep's graphs stay its own: no guard on which model it is has to run at every call."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


def _skip_model_guards(entries: list) -> list[bool]:
    """Keep the guards on the step's inputs (tokens, positions, the cache: shapes, dtypes), drop
    the ~3,000 on the model's modules and weights: evaluating them took ~1.3 ms of a ~14 ms int4
    token (default model, 2026-12-05). Sound because a StaticStep's model does not change after
    `enable` (its code object is its own, `_own_copy`, so no other model's graph can be picked)."""
    return [not entry.name.startswith(("self.model", "dict(type(self.model")) for entry in entries]


def compile_step(model: torch.nn.Module, *, batches: frozenset[int] | None = None) -> StaticStep:
    """A compiled StaticStep for `model`, its graph made now on a throwaway cache for each size in
    `batches` (batch 1 when None), so that no answer waits for it; with `batches` given, frozen
    (StaticStep.freeze) so that it never compiles again. One graph where the forward allows, else
    pieces. Raises UserError in one line when torch.compile cannot compile it (e.g. no C++
    compiler for inductor's code)."""
    step = StaticStep(model, compile=True, batches=batches)
    try:
        try:
            _warm_up(step, batches)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError):  # not one graph: in pieces
            step.allow_graph_breaks()
            _warm_up(step, batches)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"torch.compile could not compile the decode step ({type(error).__name__}: {reason})") from None
    if batches is not None:
        step.freeze()
    return step


def _warm_up(step: StaticStep, batches: frozenset[int] | None) -> None:
    device = next(step.model.parameters()).device
    for batch in sorted(batches or {1}):
        cache = step.model.new_cache(batch, 16, device=device)
        for position in range(3):  # the first call compiles; the next check the graph is reused
            step(torch.zeros(batch, 1, dtype=torch.long, device=device),
                 torch.full((batch, 1), position, device=device), cache)


def enable(model: torch.nn.Module, *, compile: bool = True) -> torch.nn.Module:
    """Decode `model` through a StaticStep from now on (compiled unless `compile=False`, which
    keeps the static-shape arithmetic in eager mode: the tests' reference). Compiling happens
    here (`compile_step`), and a batch size other than 1 compiles on its first call. The model's
    weights and modules must not change afterwards (the compiled step does not check them).
    Returns the model."""
    if compile:
        try:
            step = compile_step(model)
        except UserError as error:
            raise UserError(f"--compile: {error}; run without --compile") from None
    else:
        step = StaticStep(model, compile=False)
    model.static_step = step
    return model
