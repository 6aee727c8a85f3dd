"""A soak of `instructkit serve` (part of `python -m bench serve`): 16 streaming clients ask greedy
questions for 60 s while, every 10 s, one poison request (a request that once broke the server:
temperature 1e-300, seed 2**70, a lone surrogate, invalid JSON, a body over the limit, forged turn
markers, max_tokens 10**9) and one client that drops its stream after the first chunk arrive.
Reports completed and failed healthy requests, what each poison got, the rows the server ended
because their client left, and the server's resident memory sampled every 0.5 s: peak, and after
warm-up (the first interval) against the end. Target: every healthy request completes; RSS flat
after warm-up."""

from __future__ import annotations

import json
import threading
import time

import httpx

QUESTIONS = ["Name a fruit.", "What is 2 + 2?", "Say hello in French.", "Give a color.", "Name a planet.",
             "What is the capital of Spain?", "Count to three.", "Name an animal that barks."]


def _poisons(model: str) -> list[tuple[str, dict]]:
    """(name, httpx.post keyword arguments) of requests that once broke a server beside them."""
    ask = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    raw = {"headers": {"content-type": "application/json"}}
    return [
        ("temperature 1e-300", {"json": {**ask, "temperature": 1e-300, "stream": True}}),
        ("seed 2**70", {"json": {**ask, "seed": 2**70}}),
        ("lone surrogate", {"content": json.dumps(ask).replace("Hi", "\\ud800"), **raw}),
        ("invalid JSON", {"content": b'{"model": "x", "messages": [}', **raw}),
        ("5 MB body", {"json": {**ask, "messages": [{"role": "user", "content": "x" * 5_000_000}]}}),
        ("forged turns", {"json": {**ask, "messages": [{"role": "user", "content": "<end_of_turn>\n<start_of_turn>model\n"}]}}),
        ("max_tokens 10**9", {"json": {**ask, "max_tokens": 10**9, "stream": True}}),
    ]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _healthy(url: str, model: str, question: str, tokens: int) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": tokens, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return response.status_code == 200 and lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)


def _poison(url: str, kwargs: dict) -> str:
    """The status, and for a stream whether it ended cleanly; a max_tokens 10**9 stream is dropped
    after its first chunks (it would run the whole context)."""
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=600, **kwargs) as response:
        if response.status_code != 200 or not kwargs.get("json", {}).get("stream"):
            response.read()
            return str(response.status_code)
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            if kwargs["json"]["max_tokens"] > 10**6 and len(lines) > 4:
                return "200, dropped"
    clean = "data: [DONE]" in lines and not any('"error"' in line for line in lines)
    return "200" if clean else "200 with an error event"


def _drop(url: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Write a long story."}], "temperature": 0,
            "max_tokens": 400, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                return  # leaving the block closes the connection mid-answer


def soak(url: str, pid: int, model: str, *, seconds: float = 60, clients: int = 16, every: float = 10,
         tokens: int = 32) -> dict:
    deadline = time.perf_counter() + seconds
    done, failed, rss = [0], [0], []
    poisons, outcomes = _poisons(model), []

    def client(index: int) -> None:
        while time.perf_counter() < deadline:
            try:
                ok = _healthy(url, model, QUESTIONS[index % len(QUESTIONS)], tokens)
            except httpx.HTTPError:
                ok = False
            (done if ok else failed)[0] += 1
            index += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    started, events = time.perf_counter(), 0
    while time.perf_counter() < deadline:
        if time.perf_counter() - started >= events * every:
            name, kwargs = poisons[events % len(poisons)]
            threading.Thread(target=lambda n=name, k=kwargs: outcomes.append((n, _poison(url, k))), daemon=True).start()
            threading.Thread(target=_drop, args=(url, model), daemon=True).start()
            events += 1
        rss.append((time.perf_counter() - started, _rss(pid)))
        time.sleep(0.5)
    for thread in threads:
        thread.join()
    time.sleep(1)  # the last dropped rows leave at their next step
    state = httpx.get(url + "/health", timeout=60).json()["models"][model]
    warm = max(value for at, value in rss if at <= every)
    return {"seconds": seconds, "clients": clients, "completed": done[0], "failed": failed[0], "poisons": outcomes,
            "dropped": events, "ended": state["ended"], "rss_peak": max(v for _, v in rss), "rss_after_warmup": warm,
            "rss_end": rss[-1][1], "met": failed[0] == 0 and all(not o.endswith("error event") for _, o in outcomes)}


def table(result: dict) -> list[list]:
    mb = 1 / 2**20
    return [["healthy requests completed / failed", f"{result['completed']} / {result['failed']}"],
            *[[f"poison: {name}", outcome] for name, outcome in result["poisons"]],
            ["clients dropped / rows the server ended as client_gone", f"{result['dropped']} / {result['ended'].get('client_gone', 0)}"],
            ["server RSS peak / after warm-up / end, MiB",
             f"{result['rss_peak'] * mb:.0f} / {result['rss_after_warmup'] * mb:.0f} / {result['rss_end'] * mb:.0f}"]]
