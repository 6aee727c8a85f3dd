"""The LLM judge: Ollama's native /api/chat or any OpenAI-compatible /v1/chat/completions.

Honest by construction:
  - the chapter's prompt, word for word, by default (or a 1-5 rubric);
  - deterministic options: temperature 0, seed 123, the chapter's 2,048-token context;
  - strict parsing: a reply that is not an integer in range is counted and listed, never
    dropped; an empty model response scores 0 without asking, as in the chapter's script;
  - every answer is cached on disk (one JSONL line, fsynced) under a key of judge, options and
    the exact prompt, so a rerun or a resumed run asks nothing twice;
  - timeouts, HTTP errors and dropped connections are retried with backoff, then counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.data.prompts import ALPACA
from instructkit.errors import UserError
from instructkit.fileio import read_jsonl

SCORE_PATTERN = re.compile(r"\s*(\d{1,3})\s*")


def chapter_prompt(entry: dict, response: str) -> str:
    """The chapter's judge prompt (ch07, `generate_model_scores`)."""
    return (
        f"Given the input `{ALPACA.format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{response}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def rubric_prompt(entry: dict, response: str) -> str:
    return (
        "You grade answers to instructions.\n"
        f"Instruction and input:\n{ALPACA.format_input(entry)}\n\n"
        f"Reference answer:\n{entry['output']}\n\n"
        f"Answer to grade:\n{response}\n\n"
        "Grade the answer from 1 to 5: 5 = correct and complete, 4 = correct with minor flaws, "
        "3 = partly correct, 2 = mostly wrong, 1 = wrong or off-topic. "
        "Respond with the integer number only."
    )


PROMPTS = {"chapter": (chapter_prompt, 0, 100), "rubric": (rubric_prompt, 1, 5)}


def parse_score(reply: str, low: int, high: int) -> int | None:
    match = SCORE_PATTERN.fullmatch(reply)
    if match is None:
        return None
    value = int(match.group(1))
    return value if low <= value <= high else None


@dataclass
class JudgeConfig:
    url: str
    model: str
    api: str = "openai"  # or "ollama"
    prompt: str = "chapter"
    temperature: float = 0.0
    seed: int = 123
    num_ctx: int = 2048
    timeout: float = 60.0
    retries: int = 3
    concurrency: int = 4
    api_key: str | None = field(default=None, repr=False)

    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        if self.api == "ollama":
            return base if base.endswith("/api/chat") else base + "/api/chat"
        if base.endswith("/chat/completions"):
            return base
        return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")

    def cache_identity(self) -> dict:
        return {"model": self.model, "api": self.api, "temperature": self.temperature, "seed": self.seed, "num_ctx": self.num_ctx}


@dataclass
class Verdict:
    index: int
    score: int | None
    reply: str | None
    error: str | None = None
    cached: bool = False

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "scored" if self.score is not None else "unparsed"


class JudgeCache:
    """Append-only JSONL of {key, reply}; each line fsynced so a kill loses at most the answer in flight."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.replies: dict[str, str] = {}
        for row in read_jsonl(path):  # a torn last line from a kill is left out
            if isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("reply"), str):
                self.replies[row["key"]] = row["reply"]

    @staticmethod
    def key(config: JudgeConfig, prompt: str) -> str:
        material = json.dumps({**config.cache_identity(), "prompt": prompt}, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.replies[key] = reply
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())


class ClientError(Exception):
    """The judge answered 4xx to one request (not a configuration fault): counted, not retried."""


class JudgeClient:
    def __init__(self, config: JudgeConfig):
        import httpx

        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.http = httpx.Client(timeout=config.timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def check_reachable(self) -> None:
        import httpx

        try:
            self.http.get(self.config.url.rstrip("/") + ("/api/tags" if self.config.api == "ollama" else "/v1/models"))
        except httpx.TransportError as exc:
            raise UserError(
                f"judge server unreachable at {self.config.url} ({type(exc).__name__}); start Ollama with "
                "`ollama serve` and `ollama pull llama3`, or point --judge-url at another OpenAI-compatible server "
                "(llama.cpp: `python -m llama_cpp.server --model FILE.gguf`, with --judge-api openai)"
            ) from None

    def _refuse(self, response) -> None:
        """An answer that is not 200: a configuration fault (bad key, unknown model or path) stops
        the whole evaluation with one line; other client errors fail this request without a retry;
        server errors are retried."""
        try:
            detail = response.json().get("error")
            detail = detail.get("message") if isinstance(detail, dict) else detail
        except Exception:
            detail = None
        detail = f": {str(detail)[:160]}" if detail else ""
        status = response.status_code
        if status in (401, 403):
            raise UserError(f"judge at {self.config.url} refused the request (HTTP {status}{detail}); "
                            "check the API key (--judge-api-key-env)")
        if status == 404:
            raise UserError(f"judge at {self.config.url} answered HTTP 404{detail}; check --judge-model "
                            f"{self.config.model!r} (e.g. `ollama pull {self.config.model}`) and --judge-url/--judge-api")
        raise (ClientError if 400 <= status < 500 else RuntimeError)(f"HTTP {status}{detail}")

    def ask_once(self, prompt: str) -> str:
        """One request; raises httpx errors, ClientError (4xx), RuntimeError (5xx or a broken stream)
        or UserError (a configuration fault)."""
        config = self.config
        messages = [{"role": "user", "content": prompt}]
        if config.api == "ollama":
            payload = {"model": config.model, "messages": messages, "stream": True,
                       "options": {"seed": config.seed, "temperature": config.temperature, "num_ctx": config.num_ctx}}
            reply, finished = [], False
            with self.http.stream("POST", config.endpoint(), json=payload) as response:
                if response.status_code != 200:
                    response.read()
                    self._refuse(response)
                for line in response.iter_lines():  # NDJSON: one JSON object per line
                    if line.strip():
                        chunk = json.loads(line)
                        if chunk.get("error"):  # Ollama reports a failure mid-stream as a chunk
                            raise RuntimeError(f"the judge's stream ended with an error: {str(chunk['error'])[:160]}")
                        reply.append(chunk.get("message", {}).get("content", ""))
                        if chunk.get("done"):
                            finished = True
                            break
            if not finished:  # a cut-off stream is no answer: never cached, asked again next time
                raise RuntimeError("the judge's stream ended without done: true")
            return "".join(reply)
        payload = {"model": config.model, "messages": messages, "temperature": config.temperature,
                   "seed": config.seed, "max_tokens": 16}
        response = self.http.post(config.endpoint(), json=payload)
        if response.status_code != 200:
            self._refuse(response)
        return response.json()["choices"][0]["message"]["content"] or ""

    def ask(self, prompt: str) -> str:
        """Retry with exponential backoff; the last error propagates."""
        import httpx

        for attempt in range(self.config.retries + 1):
            try:
                return self.ask_once(prompt)
            except ClientError:
                raise  # the request itself is wrong: asking again gives the same answer
            except (httpx.HTTPError, RuntimeError, json.JSONDecodeError, KeyError, IndexError, TypeError):
                if attempt == self.config.retries:
                    raise
                time.sleep(min(8.0, 0.25 * 2**attempt))
        raise AssertionError("unreachable")


def judge_responses(
    entries: list[dict],
    config: JudgeConfig,
    cache_path: Path,
    *,
    response_key: str = "model_response",
    progress: bool = True,
) -> list[Verdict]:
    from tqdm import tqdm

    build_prompt, low, high = PROMPTS[config.prompt]
    cache = JudgeCache(cache_path)
    verdicts: list[Verdict | None] = [None] * len(entries)
    to_ask: list[tuple[int, str, str]] = []
    for index, entry in enumerate(entries):
        response = entry.get(response_key)
        if not isinstance(response, str):
            raise UserError(f"entry {index} has no string {response_key!r}")
        if response.strip() == "":
            verdicts[index] = Verdict(index, low, "")  # the chapter scores an empty response 0
            continue
        prompt = build_prompt(entry, response)
        key = JudgeCache.key(config, prompt)
        cached = cache.get(key)
        if cached is not None:
            verdicts[index] = Verdict(index, parse_score(cached, low, high), cached, cached=True)
        else:
            to_ask.append((index, prompt, key))
    if to_ask:
        client = JudgeClient(config)
        client.check_reachable()
        bar = tqdm(total=len(to_ask), desc="judge", unit="entry", disable=not progress)

        def work(item: tuple[int, str, str]) -> Verdict:
            index, prompt, key = item
            try:
                reply = client.ask(prompt)
            except UserError:
                raise  # a configuration fault: stop everything, with one line
            except Exception as exc:  # counted and listed, never silently dropped
                return Verdict(index, None, None, error=f"{type(exc).__name__}: {exc}"[:200])
            cache.put(key, reply)
            return Verdict(index, parse_score(reply, low, high), reply)

        try:
            first = work(to_ask[0])  # alone first: a wrong key or model fails fast, before any fan-out
            verdicts[first.index] = first
            bar.update(1)
            pool = ThreadPoolExecutor(max_workers=config.concurrency)
            try:
                for verdict in pool.map(work, to_ask[1:]):
                    verdicts[verdict.index] = verdict
                    bar.update(1)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            bar.close()
            client.close()
    return [v for v in verdicts if v is not None]


PAIRWISE_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, which response is better?\n"
    "Response A: `{a}`\nResponse B: `{b}`\n"
    "Respond with A, B, or TIE only."
)


def parse_preference(reply: str) -> str | None:
    word = reply.strip().strip(".").upper()
    return word if word in ("A", "B", "TIE") else None


def judge_pairwise(entries_a: list[dict], entries_b: list[dict], config: JudgeConfig, cache_path: Path,
                   *, progress: bool = True) -> list[int | None]:
    """Per entry +1 (first file better), 0 (tie), -1 (second better) or None (unparsed/failed).
    Each pair is asked in both orders; answers that contradict each other count as a tie."""
    if len(entries_a) != len(entries_b):
        raise UserError(f"cannot compare {len(entries_a)} responses with {len(entries_b)}: the files must pair up")
    cache = JudgeCache(cache_path)
    client = None
    results: list[int | None] = []

    def ask(prompt: str) -> str | None:
        nonlocal client
        key = JudgeCache.key(config, prompt)
        if (reply := cache.get(key)) is not None:
            return reply
        if client is None:
            client = JudgeClient(config)
            client.check_reachable()
        try:
            reply = client.ask(prompt)
        except UserError:
            raise
        except Exception:
            return None
        cache.put(key, reply)
        return reply

    from tqdm import tqdm

    try:
        for first, second in tqdm(list(zip(entries_a, entries_b)), desc="compare", disable=not progress):
            if first["instruction"] != second["instruction"]:
                raise UserError("the two response files list different instructions; they must cover the same entries in order")
            fields = {"input": ALPACA.format_input(first), "output": first["output"]}
            forward = ask(PAIRWISE_PROMPT.format(**fields, a=first["model_response"], b=second["model_response"]))
            backward = ask(PAIRWISE_PROMPT.format(**fields, a=second["model_response"], b=first["model_response"]))
            votes = [parse_preference(forward) if forward is not None else None,
                     parse_preference(backward) if backward is not None else None]
            if None in votes:
                results.append(None)
                continue
            score_forward = {"A": 1, "B": -1, "TIE": 0}[votes[0]]
            score_backward = {"A": -1, "B": 1, "TIE": 0}[votes[1]]
            results.append(score_forward if score_forward == score_backward else 0)
    finally:
        if client is not None:
            client.close()
    return results
