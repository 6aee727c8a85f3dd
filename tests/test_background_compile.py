"""Chat's and serve's default decoding (decode/background.py): answers start eagerly while a thread
compiles the decode step, the compiled step takes over between two steps, and the greedy tokens are
the eager path's throughout; a server keeps every request across the switch; the compiled code is
kept in instructkit's cache folder and a second compile reads it (decode/compile_cache.py).

Compiling is slow on a CPU, so each preset is compiled once for the whole module (`_started`), in
the background as chat does it; the other tests reuse that step. No test asserts on time."""

from __future__ import annotations

import functools
import os
import threading

import pytest
import torch

from instructkit.cli import build_parser
from instructkit.decode import background, static_decode
from instructkit.decode.compile_cache import cache_counts, compile_cache_dir
from instructkit.decode.generate import Request, generate, stream_tokens
from instructkit.decode.load import prepare_for_decoding
from instructkit.models.registry import load_model
from instructkit.serve.worker import END, Worker

TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog again", "1 2 3", "A\tb"]
NEW = 24


def _eager_tokens(loaded, prompts):
    """Greedy tokens of each prompt alone, and of all of them as one batch, on the eager path."""
    alone = [list(stream_tokens(loaded.model, loaded.tokenizer, p, max_new_tokens=NEW)) for p in prompts]
    together = [r.token_ids for r in generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=NEW)]
    return alone, together


@functools.cache
def _started(name: str) -> dict:
    """`name` loaded as chat loads it (its default quantization), its eager tokens, then its step
    compiled in the background while this thread keeps decoding eagerly (as a chat answers)."""
    loaded = prepare_for_decoding(load_model(name, seed=7), quantize="auto")
    prompts = [loaded.tokenizer.encode(text) for text in TEXTS]
    expected = _eager_tokens(loaded, prompts)
    handle = background.compile_in_background(loaded.model)
    during, rounds = [], 0
    while rounds < 2 and (rounds == 0 or not handle.done.is_set()):  # answers while it compiles (one at least)
        during.append(list(stream_tokens(loaded.model, loaded.tokenizer, prompts[rounds % len(prompts)], max_new_tokens=NEW)))
        rounds += 1
    handle.wait()
    return {"loaded": loaded, "prompts": prompts, "expected": expected, "handle": handle, "during": during}


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gpt2"])
def test_tokens_are_the_eager_ones_while_compiling_and_after_the_switch(name):
    started = _started(name)
    loaded, prompts, (alone, together), handle = (started[k] for k in ("loaded", "prompts", "expected", "handle"))
    assert handle.state == "compiled", handle.error
    assert loaded.model.static_step.compiled and background.describe(loaded.model) == "compiled"
    assert started["during"] == [alone[i % len(prompts)] for i in range(len(started["during"]))]
    assert _eager_tokens(loaded, prompts) == (alone, together)  # batch 1 compiled, the batch of 4 eager


def _gated_compile(monkeypatch, step):
    """compile_step replaced by one that waits for the test's go, then hands over `step` (compiled
    once for the module): the switch lands where the test wants it, without another compile."""
    go, asked = threading.Event(), threading.Event()

    def compile_step(model, *, batches=None):
        asked.set()
        assert go.wait(120), "the test never released the compile"
        return step

    monkeypatch.setattr(static_decode, "compile_step", compile_step)
    return go, asked


def test_the_switch_lands_between_two_steps_of_an_answer(monkeypatch):
    started = _started("tiny-gemma3")
    loaded, prompts, (alone, _) = started["loaded"], started["prompts"], started["expected"]
    step = loaded.model.static_step
    del loaded.model.static_step  # eager again, as at start
    calls = []
    monkeypatch.setattr(step, "_forward", _counting(step._forward, calls))
    go, asked = _gated_compile(monkeypatch, step)
    handle = background.compile_in_background(loaded.model)
    assert asked.wait(60)
    tokens = stream_tokens(loaded.model, loaded.tokenizer, prompts[1], max_new_tokens=NEW)
    first = [next(tokens) for _ in range(5)]  # eager steps
    go.set()
    assert handle.wait(60) and handle.state == "compiled"
    rest = list(tokens)
    assert first + rest == alone[1]
    assert 0 < len(calls) < NEW  # the later steps ran compiled


def _counting(function, calls):
    def counted(*args):
        calls.append(args[0].shape[0])
        return function(*args)
    return counted


def test_a_server_keeps_every_request_across_the_switch(monkeypatch):
    """Requests in flight, one at a time and together, while the compiled step takes over: all of
    them end normally with the eager tokens; /health's state says how the model decodes."""
    started = _started("tiny-gemma3")
    loaded, prompts, (alone, together) = started["loaded"], started["prompts"], started["expected"]
    step = loaded.model.static_step
    del loaded.model.static_step
    go, asked = _gated_compile(monkeypatch, step)
    handle = background.compile_in_background(loaded.model)
    worker = Worker(loaded.model, loaded.tokenizer, max_batch=4)
    try:
        assert worker.state()["decoding"] == "eager (compiling the decode step)"
        results, done = {}, threading.Semaphore(0)

        def submit(key, prompt):
            request, tokens = Request(list(prompt), NEW), []
            results[key] = (request, tokens)

            def deliver(item):
                if item is END or isinstance(item, Exception):
                    done.release()
                else:
                    tokens.append(item)
            worker.submit(request, deliver)

        submit("first", prompts[0])
        for i, prompt in enumerate(prompts):
            submit(i, prompt)
        assert asked.wait(60)
        go.set()  # lands while those requests decode
        assert handle.wait(60) and handle.state == "compiled"
        submit("after", prompts[2])  # alone after the batch: compiled
        for _ in results:
            assert done.acquire(timeout=120)
        assert worker.state()["decoding"] == "compiled"
        assert all(request.finish_reason in ("length", "stop_token") for request, _ in results.values())
        assert results["first"][1] == alone[0] and results["after"][1] == alone[2]
        assert [results[i][1] for i in range(len(prompts))] in (together, alone)
    finally:
        worker.stop()


def test_a_second_compile_reads_the_cache_folder():
    """The step compiled above left its code under instructkit's cache folder; compiling the same
    step again (a new StaticStep: dynamo traces it afresh, as a new process would) finds it there."""
    loaded = _started("tiny-gemma3")["loaded"]
    folder = compile_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert folder.is_dir() and any(folder.rglob("*"))
    before = cache_counts()
    step = static_decode.compile_step(loaded.model, batches=frozenset({1}))
    after = cache_counts()
    assert after["hits"] > before["hits"] and after["misses"] == before["misses"]
    assert step.compiled


def test_a_failed_background_compile_leaves_the_model_eager(monkeypatch, capsys):
    def broken_compile(fn, **options):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(long traceback)")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    loaded = load_model("tiny-gemma3", seed=7)
    handle = background.compile_in_background(loaded.model)
    assert handle.wait(60) and handle.state == "failed"
    assert not hasattr(loaded.model, "static_step")
    assert "No working C++ compiler" in background.describe(loaded.model)
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "decoding stays eager" in line
    prompt = loaded.tokenizer.encode(TEXTS[0])
    assert len(list(stream_tokens(loaded.model, loaded.tokenizer, prompt, max_new_tokens=4))) == 4


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_compile_flags(command):
    parser = build_parser()
    base = [command, "--model", "tiny-gemma3"]
    assert parser.parse_args(base).compile == "background"
    assert parser.parse_args(base + ["--compile"]).compile == "now"  # its older meaning
    assert parser.parse_args(base + ["--compile", "off"]).compile == "off"
    assert parser.parse_args(base + ["--no-compile"]).compile == "off"
    assert parser.parse_args(["generate", "--prompt", "x"]).compile == "off"
    assert parser.parse_args(["generate", "--prompt", "x", "--compile"]).compile == "now"


def test_chat_says_when_the_compiled_step_takes_over():
    from instructkit.data.prompts import get_prompt_style
    from instructkit.serve.chat import ChatSession

    loaded = load_model("tiny-gemma3")
    session = ChatSession(loaded, get_prompt_style("gemma"))
    assert session.decoding_note() is None  # no background compile: nothing to say
    handle = type("Handle", (), {"state": "compiling", "seconds": None, "error": None})()
    loaded.model.background_compile = handle
    assert "compiles in the background" in session.decoding_note()
    assert session.decoding_note() is None  # said once
    handle.state, handle.seconds = "compiled", 12.0
    assert "compiled decode step" in session.decoding_note() and session.decoding_note() is None
