"""The LLM judge: Ollama's native /api/chat or any OpenAI-compatible /v1/chat/completions.

Honest by construction:
  - the chapter's prompt, word for word, by default (or a 1-5 rubric);
  - deterministic options: temperature 0, seed 123, the chapter's 2,048-token context;
  - strict parsing: a reply that is not an integer in range is counted and listed, never
    dropped; an empty model response scores 0 without asking, as in the chapter's script;
  - every answer is cached on disk (one JSONL line, fsynced) under a key of judge, options and
    the exact prompt, so a rerun or a resumed run asks nothing twice;
  - every call has one overall deadline (`timeout`), however the server trickles its bytes;
    timeouts, 5xx, 429 and dropped connections are retried with backoff (honouring a bounded
    Retry-After), then counted; a reply of the wrong shape is counted, never cached (judge_http.py);
  - a judge that leaves more than `max_failures` of the entries unscored, or scores none of those
    it was asked, fails the evaluation (evaluation.py) rather than reporting a mean of what is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.data.prompts import ALPACA
from instructkit.errors import UserError
from instructkit.evaluate.judge_http import JudgeClient
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
    max_failures: float = 0.1  # share of entries left unscored above which the evaluation fails
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
    asked: bool = True  # False: an empty response, scored without asking the judge

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
            verdicts[index] = Verdict(index, low, "", asked=False)  # the chapter scores an empty response 0
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
