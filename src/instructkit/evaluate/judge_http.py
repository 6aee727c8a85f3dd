"""Talking to a judge server: one request under one overall deadline, retries with backoff that
honour a bounded Retry-After, and which answers count as failures (see judge.py for the rest).

Failures, by what happens next:
  - UserError: a configuration fault (bad key, unknown model or path) stops the evaluation;
  - ClientError, BadReply: this request is wrong or its reply has the wrong shape: counted, not retried;
  - everything else (timeouts, the deadline, 5xx, 429, dropped connections, broken streams): retried,
    then counted. Nothing but a string reply ever reaches the cache.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import TYPE_CHECKING

from instructkit.errors import UserError

if TYPE_CHECKING:
    from instructkit.evaluate.judge import JudgeConfig

REPLY_TOKENS = 16  # an integer, or A/B/TIE, fits; a judge that rambles is cut off (max_tokens, num_predict)
MAX_REPLY_BYTES = 1 << 20  # a reply is a few bytes: a server sending more is broken, not slow
MAX_RETRY_AFTER = 30.0  # seconds: a server asking to wait longer is asked again after this long


class ClientError(Exception):
    """The judge answered 4xx to one request (not a configuration fault): counted, not retried."""


class BadReply(ClientError):
    """A reply of the wrong shape (content that is not a string): counted, not retried, since at
    temperature 0 the judge gives the same reply again, and never cached."""


class ServerBusy(RuntimeError):
    """5xx or 429: retried, after the server's Retry-After when it sent one."""

    def __init__(self, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(RuntimeError):
    """The call took longer than `timeout` in all, though each read was quick (a trickling stream)."""


def retry_delay(attempt: int, retry_after: str | None) -> float:
    """Seconds before asking again after failed attempt `attempt` (0-based): exponential backoff, or
    the server's Retry-After (seconds or an HTTP date), never more than MAX_RETRY_AFTER."""
    backoff = min(8.0, 0.25 * 2**attempt)
    if not retry_after:
        return backoff
    try:
        wanted = float(retry_after)
    except ValueError:
        try:
            wanted = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
        except (TypeError, ValueError):
            return backoff
    return min(MAX_RETRY_AFTER, max(0.0, wanted)) if math.isfinite(wanted) else backoff


def _within(response, deadline: float):
    """The response body in chunks, stopped at the call's deadline or at MAX_REPLY_BYTES. httpx's
    timeout bounds each read only, so a server sending a byte a second would otherwise never end;
    a wait for the next chunk is still bounded by that timeout, so a call ends within 2 x timeout."""
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if time.monotonic() > deadline:
            raise DeadlineExceeded("the judge's answer took longer than the deadline (--judge-timeout)")
        if size > MAX_REPLY_BYTES:
            raise RuntimeError(f"the judge's answer exceeded {MAX_REPLY_BYTES:,} bytes")
        yield chunk


def _lines(chunks):
    """NDJSON lines from byte chunks (iter_lines would wait for a newline without seeing the deadline)."""
    buffer = b""
    for chunk in chunks:
        *lines, buffer = (buffer + chunk).split(b"\n")
        yield from lines
    yield buffer


def _content(message, where: str) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise BadReply(f"the judge's {where} content is {json.dumps(content)[:60]}, not a string")
    return content


class JudgeClient:
    """One HTTP client per evaluation, shared by its worker threads."""

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

    def _refuse(self, response, body: bytes) -> None:
        """An answer that is not 200: a configuration fault (bad key, unknown model or path) stops
        the whole evaluation with one line; other client errors fail this request without a retry;
        server errors and 429 (too many requests) are retried."""
        try:
            detail = json.loads(body).get("error")
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
        if status == 429 or status >= 500:
            raise ServerBusy(f"HTTP {status}{detail}", response.headers.get("retry-after"))
        raise (ClientError if 400 <= status < 500 else RuntimeError)(f"HTTP {status}{detail}")

    def ask_once(self, prompt: str) -> str:
        """One request, ended at its deadline; raises httpx errors, ClientError (4xx, a reply of the
        wrong shape), RuntimeError (5xx, 429, a broken stream, the deadline) or UserError (a
        configuration fault)."""
        config = self.config
        deadline = time.monotonic() + config.timeout
        messages = [{"role": "user", "content": prompt}]
        if config.api == "ollama":
            payload = {"model": config.model, "messages": messages, "stream": True,
                       "options": {"seed": config.seed, "temperature": config.temperature, "num_ctx": config.num_ctx,
                                   "num_predict": REPLY_TOKENS}}
            with self.http.stream("POST", config.endpoint(), json=payload) as response:
                if response.status_code != 200:
                    self._refuse(response, b"".join(_within(response, deadline)))
                return self._ollama_reply(_lines(_within(response, deadline)))
        payload = {"model": config.model, "messages": messages, "temperature": config.temperature,
                   "seed": config.seed, "max_tokens": REPLY_TOKENS}
        with self.http.stream("POST", config.endpoint(), json=payload) as response:
            body = b"".join(_within(response, deadline))
        if response.status_code != 200:
            self._refuse(response, body)
        return _content(json.loads(body)["choices"][0]["message"], "reply's")

    @staticmethod
    def _ollama_reply(lines) -> str:
        """Ollama's NDJSON stream: content pieces, the last object with done: true."""
        reply = []
        for line in lines:
            if not line.strip():
                continue
            chunk = json.loads(line)
            if not isinstance(chunk, dict):
                raise RuntimeError(f"the judge's stream sent {line[:60]!r}, not a JSON object")
            if chunk.get("error"):  # Ollama reports a failure mid-stream as a chunk
                raise RuntimeError(f"the judge's stream ended with an error: {str(chunk['error'])[:160]}")
            reply.append(_content(chunk.get("message", {"content": ""}), "stream's"))
            if chunk.get("done"):
                return "".join(reply)
        raise RuntimeError("the judge's stream ended without done: true")  # no answer: never cached

    def ask(self, prompt: str) -> str:
        """Retry with exponential backoff (or the server's Retry-After); the last error propagates."""
        import httpx

        for attempt in range(self.config.retries + 1):
            try:
                return self.ask_once(prompt)
            except ClientError:
                raise  # the request itself is wrong: asking again gives the same answer
            except (httpx.HTTPError, RuntimeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                if attempt == self.config.retries:
                    raise
                time.sleep(retry_delay(attempt, getattr(exc, "retry_after", None)))
        raise AssertionError("unreachable")
