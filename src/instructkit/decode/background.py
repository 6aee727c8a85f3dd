"""The decode step compiled in a background thread while the eager path answers: chat and serve's
default (`--compile background`).

Why: at batch 1 the compiled step (static_decode.py) decodes int8 at ~1.7x the eager speed, but
its first compile on a machine takes 60-100 s (seconds later, from decode/compile_cache.py), and
nobody should wait that long for a first answer. So the model answers eagerly at once while a
thread compiles; when the step is ready it is attached as `model.static_step`, which the engine
reads once per step (decoder.Decoder._forward): the switch falls between two steps, never inside
one, and rows already decoding go on through it. Greedy tokens are the same either side of the
switch (tests/test_background_compile.py).

Only the batch sizes compiled here (`batches`, batch 1 by default: a chat, or one user of the
server) run compiled afterwards; a batch of another size stays eager rather than stopping the
decoding thread for a compile of its own (StaticStep's `batches`).

The cost: while it compiles, the thread holds Python's interpreter lock for much of its work and
takes a core, so eager tokens come slower than alone (`python -m bench quantized` measures both).
A compile that fails leaves the model eager and says why in one line on stderr.
"""

from __future__ import annotations

import sys
import threading
import time

import torch

from instructkit.errors import UserError


class BackgroundCompile:
    """One model's step being compiled by a daemon thread (so a chat that ends meanwhile exits).
    `state`: "compiling", then "compiled" (the model decodes through the step from its next step
    on) or "failed" (`error` says why; the model stays eager)."""

    def __init__(self, model: torch.nn.Module, batches: tuple[int, ...] = (1,), *, quiet: bool = False):
        self.model, self.batches, self.quiet = model, frozenset(batches), quiet
        self.state, self.error = "compiling", None
        self.seconds: float | None = None  # from the start to the switch
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compile-decode-step", daemon=True)
        self._started = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        from instructkit.decode.static_decode import compile_step

        try:
            step = compile_step(self.model, batches=self.batches)
            self.model.static_step = step  # one attribute store: the engine's next step reads it
            self.state = "compiled"
        except Exception as error:  # UserError's one line, or anything else said as briefly
            self.error = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            self.state = "failed"
            if not self.quiet:
                print(f"instructkit: {self.error}; decoding stays eager", file=sys.stderr, flush=True)
        finally:
            self.seconds = time.perf_counter() - self._started
            self.done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the compile has ended (compiled or failed) within `timeout` seconds."""
        return self.done.wait(timeout)


def compile_in_background(model: torch.nn.Module, batches: tuple[int, ...] = (1,), *,
                          quiet: bool = False) -> BackgroundCompile:
    """Start compiling `model`'s decode step for `batches` in a thread; it decodes eagerly until
    then. The handle is also kept as `model.background_compile` (what `describe` reads)."""
    handle = BackgroundCompile(model, batches, quiet=quiet)
    model.background_compile = handle
    return handle


def describe(model: torch.nn.Module) -> str:
    """How `model` decodes now, for chat's and the server's status: "eager", "eager (compiling the
    decode step)", "compiled", or "eager (compile failed: ...)"."""
    handle = getattr(model, "background_compile", None)
    if handle is None:
        return "compiled" if getattr(getattr(model, "static_step", None), "compiled", False) else "eager"
    return {"compiling": "eager (compiling the decode step)", "compiled": "compiled",
            "failed": f"eager (compile failed: {handle.error})"}[handle.state]
