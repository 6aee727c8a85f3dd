"""`instructkit synth`: new instruction data from a served model, Magpie-style (the chapter's
bonus notebook), made reproducible, resumable and honest about what it dropped.

Two stages against a raw-completion endpoint (no chat template applied by the server): our own
`instructkit serve` (`/v1/completions`) or Ollama (`/api/generate` with `raw: true` and the
sampling parameters inside `options`, where Ollama reads them; the chapter's notebook puts seed
and temperature at the top level, where Ollama ignores them).
  1. query: the model continues a preset's pre-query text (the start of a user turn) at a high
     temperature and writes an instruction;
  2. response: the instruction in the preset's chat format, at a lower temperature.
Item k uses seed + k in both stages, so a run is reproducible and a killed run, continued, makes
the same items without duplicates. Filters: length, a clean ending (the model stopped by itself),
refusals, echoes, and exact + near (TF-IDF >= 0.8) duplicates of accepted queries. Every item ends
in the log with its fate (accepted, the filter that dropped it, or the error that failed it after
retries with backoff), so nothing is dropped silently; failed items are tried again next time.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from instructkit.data.similarity import normalize
from instructkit.errors import UserError
from instructkit.fileio import append_jsonl, read_jsonl

REFUSALS = re.compile(r"\b(I'?m sorry|I am sorry|I cannot|I can'?t help|as an AI|I am unable|I'm unable)\b", re.IGNORECASE)


def presets() -> dict[str, dict]:
    return json.loads((resources.files("instructkit.datatools") / "synth_presets.json").read_text(encoding="utf-8"))


@dataclass
class SynthConfig:
    url: str
    api: str = "openai"  # "openai" (raw /v1/completions) or "ollama" (/api/generate, raw)
    model: str = "gemma-3-270m"
    preset: str = "gemma"
    n: int = 10
    out: str = "synth.jsonl"
    seed: int = 123
    query_temperature: float = 1.0
    response_temperature: float = 0.7
    top_p: float = 0.95
    query_max_tokens: int = 96
    response_max_tokens: int = 256
    min_chars: int = 8
    max_chars: int = 2000
    near_threshold: float = 0.8
    concurrency: int = 4
    retries: int = 3
    timeout: float = 120.0
    max_attempts_factor: int = 5  # give up after n * this many items
    api_key: str | None = field(default=None, repr=False)


class Backend:
    """One raw completion: (text, stopped by itself?)."""

    def __init__(self, config: SynthConfig):
        import httpx

        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.http = httpx.Client(timeout=config.timeout, headers=headers)

    def body(self, prompt: str, *, temperature: float, max_tokens: int, stop: list[str], seed: int) -> dict:
        c = self.config
        if c.api == "ollama":
            return {"model": c.model, "prompt": prompt, "raw": True, "stream": False,
                    "options": {"temperature": temperature, "top_p": c.top_p, "seed": seed, "num_predict": max_tokens,
                                "stop": stop}}
        return {"model": c.model, "prompt": prompt, "temperature": temperature, "top_p": c.top_p, "seed": seed,
                "max_tokens": max_tokens, "stop": stop[:4]}

    def endpoint(self) -> str:
        base = self.config.url.rstrip("/")
        return base + ("/api/generate" if self.config.api == "ollama" else ("/completions" if base.endswith("/v1") else "/v1/completions"))

    def complete(self, body: dict) -> tuple[str, bool]:
        import httpx

        last = "no attempt"
        for attempt in range(self.config.retries + 1):
            try:
                response = self.http.post(self.endpoint(), json=body)
            except httpx.TransportError as exc:  # timeouts and dropped connections: retried
                last = f"{type(exc).__name__}"
            else:
                if response.status_code == 200:
                    data = response.json()
                    if self.config.api == "ollama":
                        return data.get("response", ""), data.get("done_reason", "stop") == "stop"
                    choice = data["choices"][0]
                    return choice.get("text", ""), choice.get("finish_reason") == "stop"
                if response.status_code in (401, 403, 404):
                    raise UserError(f"{self.endpoint()} answered HTTP {response.status_code}: check --url, --api, "
                                    f"--model {self.config.model!r} and the API key")
                last = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    break  # the request itself is wrong: asking again gives the same answer
            if attempt < self.config.retries:
                time.sleep(min(8.0, 0.2 * 2**attempt))
        raise RuntimeError(last)


def _clean(text: str, config: SynthConfig) -> tuple[str, str | None]:
    """The text and the reason it is dropped, if it is."""
    text = text.strip()
    if len(text) < config.min_chars:
        return text, "too short"
    if len(text) > config.max_chars:
        return text, "too long"
    if REFUSALS.search(text):
        return text, "refusal"
    return text, None


class Synthesizer:
    def __init__(self, config: SynthConfig, *, say=print):
        if config.preset not in presets():
            raise UserError(f"--preset {config.preset!r} is not one of {', '.join(presets())}")
        if config.api not in ("openai", "ollama"):
            raise UserError(f"--api must be openai or ollama, got {config.api!r}")
        if config.n <= 0 or config.concurrency <= 0:
            raise UserError("--n and --concurrency must be positive")
        self.config, self.say = config, say
        self.preset = presets()[config.preset]
        self.out = Path(config.out)
        self.log = self.out.with_name(self.out.name + ".log.jsonl")
        self.backend = Backend(config)

    def query_body(self, k: int) -> dict:
        c = self.config
        return self.backend.body(self.preset["pre_query"], temperature=c.query_temperature, max_tokens=c.query_max_tokens,
                                 stop=self.preset["query_stop"], seed=c.seed + k)

    def response_body(self, k: int, instruction: str) -> dict:
        c = self.config
        return self.backend.body(self.preset["response_template"].replace("{instruction}", instruction),
                                 temperature=c.response_temperature, max_tokens=c.response_max_tokens,
                                 stop=self.preset["response_stop"], seed=c.seed + k)

    def provenance(self, k: int) -> dict:
        c = self.config
        return {"backend": c.api, "model": c.model, "preset": c.preset, "seed": c.seed + k,
                "query_options": {"temperature": c.query_temperature, "top_p": c.top_p, "max_tokens": c.query_max_tokens},
                "response_options": {"temperature": c.response_temperature, "top_p": c.top_p,
                                     "max_tokens": c.response_max_tokens}}

    def _query(self, k: int) -> dict:
        try:
            text, stopped = self.backend.complete(self.query_body(k))
        except RuntimeError as exc:
            return {"k": k, "status": "failed", "stage": "query", "error": str(exc)}
        instruction, reason = _clean(text, self.config)
        if reason is None and not stopped:
            reason = "query did not end by itself"
        if reason is None and normalize(instruction) == normalize(self.preset["pre_query"]):
            reason = "echo"
        return {"k": k, "status": "dropped" if reason else "query", "reason": reason, "instruction": instruction}

    def _respond(self, item: dict) -> dict:
        try:
            text, stopped = self.backend.complete(self.response_body(item["k"], item["instruction"]))
        except RuntimeError as exc:
            return {**item, "status": "failed", "stage": "response", "error": str(exc)}
        output, reason = _clean(text, self.config)
        if reason is None and not stopped:
            reason = "response did not end by itself"
        if reason is None and normalize(item["instruction"]) in normalize(output) and len(output) < 2 * len(item["instruction"]):
            reason = "echo"
        return {**item, "status": "dropped" if reason else "accepted", "reason": reason, "output": output}

    def run(self) -> dict:
        from instructkit.data.similarity import tfidf

        c = self.config
        done = {row["k"]: row for row in read_jsonl(self.log) if row.get("status") in ("accepted", "dropped")}
        accepted = [row for row in read_jsonl(self.out)]
        queries = [r["instruction"] for r in accepted]
        failed: list[dict] = []
        k = 0
        with ThreadPoolExecutor(max_workers=c.concurrency) as pool:
            while len(accepted) < c.n and k < c.n * c.max_attempts_factor:
                wave = [i for i in range(k, k + c.concurrency * 2) if i not in done][: c.n - len(accepted) + c.concurrency]
                k += c.concurrency * 2
                if not wave:
                    continue
                first = list(pool.map(self._query, wave))
                for item in first:  # duplicates, in k order, so the outcome does not depend on timing
                    if item["status"] != "query":
                        continue
                    if normalize(item["instruction"]) in {normalize(q) for q in queries}:
                        item.update(status="dropped", reason="duplicate query")
                        continue
                    if queries:
                        matrix = tfidf(queries + [item["instruction"]])
                        if float((matrix[-1] @ matrix[:-1].T).max()) >= c.near_threshold:
                            item.update(status="dropped", reason="near-duplicate query")
                            continue
                    queries.append(item["instruction"])
                second = list(pool.map(lambda it: self._respond(it) if it["status"] == "query" else it, first))
                rows = []
                for item in sorted(second, key=lambda it: it["k"]):
                    if item["status"] == "accepted" and len(accepted) + len(rows) < c.n:
                        rows.append({"instruction": item["instruction"], "input": "", "output": item["output"],
                                     "provenance": self.provenance(item["k"])})
                    elif item["status"] == "accepted":
                        item.update(status="dropped", reason="enough items")
                    if item["status"] == "failed":
                        failed.append(item)
                append_jsonl(self.out, rows)
                append_jsonl(self.log, [{key: item.get(key) for key in ("k", "status", "reason", "stage", "error")}
                                        for item in sorted(second, key=lambda it: it["k"])])
                accepted += rows
                for item in second:
                    done[item["k"]] = item
        reasons: dict[str, int] = {}
        for item in done.values():
            if item.get("status") == "dropped":
                reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        return {"accepted": len(accepted), "attempted": len(done) + len(failed), "dropped": reasons,
                "failed": [{"k": f["k"], "stage": f.get("stage"), "error": f.get("error")} for f in failed],
                "out": str(self.out), "log": str(self.log)}

    def dry_run(self) -> list[dict]:
        return [{"url": self.backend.endpoint(), "stage": "query", "body": self.query_body(0)},
                {"url": self.backend.endpoint(), "stage": "response", "body": self.response_body(0, "<the generated instruction>")}]


def respond_only(config: SynthConfig, records: list[dict]) -> dict:
    """Add responses to existing instructions (the chapter's "add responses" notebook): each record
    k gets seed + k; records that already have an output are kept as they are."""
    synthesizer = Synthesizer(config)
    done = {row["k"] for row in read_jsonl(synthesizer.log) if row.get("status") in ("accepted", "dropped")}
    todo = [k for k, record in enumerate(records) if k not in done]
    instruction_of = lambda r: r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")  # noqa: E731
    with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        results = list(pool.map(lambda k: synthesizer._respond({"k": k, "instruction": instruction_of(records[k])}), todo))
    rows, log = [], []
    for k, result in zip(todo, results):
        if result["status"] == "accepted":
            rows.append({**records[k], "output": result["output"], "provenance": synthesizer.provenance(k)})
        log.append({key: result.get(key) for key in ("k", "status", "reason", "stage", "error")})
    append_jsonl(synthesizer.out, rows)
    append_jsonl(synthesizer.log, log)
    failed = [r for r in results if r["status"] == "failed"]
    return {"accepted": len(rows), "attempted": len(todo), "failed": [{"k": f["k"], "error": f["error"]} for f in failed],
            "dropped": {r["reason"]: sum(1 for x in results if x.get("reason") == r["reason"])
                        for r in results if r["status"] == "dropped"}, "out": str(synthesizer.out)}


def config_dict(config: SynthConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k != "api_key"}
