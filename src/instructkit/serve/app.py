"""`instructkit serve`: an OpenAI-compatible server and a chat page, on our own engine.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (the
messages rendered with the model's prompt style, once), POST /v1/completions (the prompt passed
raw, no template; texts or token ids, several per request, with `logprobs` and `echo`:
scoring.py), GET /tokenizer_info, POST /tokenize and /detokenize (what lm-evaluation-harness's
local-completions reads), and the page at / (static files shipped in the package; no CDN).

Streaming is Server-Sent Events as OpenAI's clients expect: the first chunk carries the assistant
role, every chunk has id, object, created, model and choices[i].index with finish_reason null
until one terminal chunk, an optional usage chunk with empty choices, then `data: [DONE]`. Text
comes from generate.TextStream (no broken UTF-8, no part of a stop string that is later cut), so
the joined deltas equal the non-streamed answer. A failure mid-stream is an error event, and it
is that request's alone (worker.py). A client that goes away, streamed or not, cancels its row,
which leaves the batch at the next decode step (or the queue at once). Messages are tokenized off
the event loop, their text as text (conversation.py); guard.py checks every request first. Every
error is answered in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from importlib import resources

# FastAPI reads the endpoints' annotations (strings, with postponed evaluation) from this module.
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from instructkit.data.prompts import PromptStyle
from instructkit.decode.generate import Request, Sampling, TextStream
from instructkit.errors import UserError
from instructkit.models.registry import LoadedModel
from instructkit.serve.conversation import encode_conversation
from instructkit.serve.guard import SECURITY_HEADERS, Guard, HostCheck
from instructkit.serve.scoring import openai_logprobs, token_logprobs
from instructkit.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    model_card,
    new_id,
    now,
    usage,
)
from instructkit.serve.worker import END, Worker

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_REQUEST_BYTES = 4_000_000
# KV-cache slots (rows x tokens) a model's batch may plan for; Gemma 3 270M's fp32 cache holds
# ~37 KB a slot, so the default is ~1.2 GB.
DEFAULT_MAX_CACHE_TOKENS = 32_768
log = logging.getLogger("instructkit.serve")


@dataclass
class ServedModel:
    id: str
    loaded: LoadedModel
    style: PromptStyle
    role: str  # "fine-tuned", "base" or "model": what the page labels it
    worker: Worker = field(init=False)
    created: int = field(default_factory=now)

    def start(self, max_batch: int, max_cache_tokens: int | None = None) -> "ServedModel":
        self.worker = Worker(self.loaded.model, self.loaded.tokenizer, max_batch=max_batch,
                             max_cache_tokens=max_cache_tokens, name=self.id)
        self.loaded.tokenizer.encode_text("")  # builds the text-only tokenizer now, not in a request
        return self

    @property
    def context(self) -> int:
        """Tokens a request may use: the model's context, or less under a cache budget."""
        return min(self.loaded.model.config.context_length, self.worker.max_cache_tokens or 1 << 62)


def _known_ids(ids: list[int], served: ServedModel) -> list[int]:
    vocabulary = served.loaded.model.config.vocab_size
    if not ids:
        raise ApiError(400, "a prompt of token ids needs at least one id", param="prompt")
    if (largest := max(ids)) >= vocabulary:
        raise ApiError(400, f"token id {largest} is outside {served.id}'s vocabulary of {vocabulary}", param="prompt")
    return list(ids)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class _Generation:
    """One request's run through a model's worker, read as text pieces."""

    def __init__(self, served: ServedModel, prompt_ids: list[int], max_tokens: int, sampling: Sampling,
                 stop_ids: set[int], stop_strings: list[str], http_request: HttpRequest):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = served.worker
        self.request = Request(prompt_ids, max_tokens, frozenset(stop_ids), sampling)
        self.stream = TextStream(served.loaded.tokenizer, stop_strings)
        self.prompt_tokens = len(prompt_ids)
        # Waits for the client to go away, whether the answer is streamed or not, and cancels the row
        # at once, so it leaves at the next step instead of running to its end.
        self.watcher = asyncio.create_task(self._watch(http_request))
        self.worker.submit(self.request, lambda item: self.loop.call_soon_threadsafe(self.queue.put_nowait, item))

    async def _watch(self, http_request: HttpRequest) -> None:
        while (await http_request.receive())["type"] != "http.disconnect":
            pass
        self.worker.cancel(self.request, "client_gone")

    async def pieces(self):
        """Text pieces until the end; raises the worker's exception if this request's decoding failed."""
        try:
            while True:
                item = await self.queue.get()
                if item is END:
                    if rest := self.stream.finish():
                        yield rest
                    return
                if isinstance(item, Exception):
                    raise item
                piece = self.stream.push(item)
                if piece:
                    yield piece
                if self.stream.stopped:
                    self.worker.cancel(self.request, "stop_string")
                    return
        finally:
            self.watcher.cancel()
            self.worker.cancel(self.request, "client_gone")  # a no-op once the request has finished

    async def text(self) -> str:
        """The whole answer (not streamed); a failed decoding is a 500 in OpenAI's shape."""
        try:
            return "".join([piece async for piece in self.pieces()])
        except Exception as exc:
            raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error") from None

    @property
    def finish_reason(self) -> str:
        return "length" if self.request.finish_reason == "length" and not self.stream.stopped else "stop"

    @property
    def completion_tokens(self) -> int:
        return len(self.stream.ids)


def _shaped(status: int, message: str, *, param: str | None = None, code: str | None = None,
            kind: str = "invalid_request_error") -> JSONResponse:
    # Set here too: a 500 is written by Starlette's outermost layer, outside the Guard.
    return JSONResponse(ApiError(status, message, param=param, code=code, kind=kind).body(), status_code=status,
                        headers=SECURITY_HEADERS)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """The most specific of pydantic's errors (a union reports one per member), without its
    union-member tags; a body that is not JSON is a 400 that says where it breaks."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        where = errors[0]["loc"][-1]
        reason = errors[0].get("ctx", {}).get("error", "JSON decode error")
        return _shaped(400, f"the request body is not valid JSON: {reason} at character {where}", code="invalid_json")
    first = max(errors, key=lambda error: len(error.get("loc", ())), default={})
    parts = [str(part) for part in first.get("loc", ())[1:] if not (isinstance(part, str) and "[" in part)]
    param = ".".join(parts) or None
    message = first.get("msg", "invalid request")
    return _shaped(422, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def create_app(models: list[ServedModel], *, api_key: str | None = None, hosts: HostCheck | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The app; `hosts` None accepts any Host header (serve() always passes the bound host's)."""
    by_id = {served.id: served for served in models}
    static = resources.files("instructkit.serve") / "static"
    app = FastAPI(title="instructkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, hosts=hosts, max_request_bytes=max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException):  # unknown routes, wrong methods, bodies that are not UTF-8
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be parsed: it must be JSON, in UTF-8"
        return _shaped(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        log.error("request failed", exc_info=exc)
        return _shaped(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    def pick(model_id: str) -> ServedModel:
        if model_id in by_id:
            return by_id[model_id]
        raise ApiError(404, f"The model {model_id!r} does not exist (served: {', '.join(by_id)})",
                       param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if api_key:  # open to anyone, so it says nothing about the traffic
            return {"status": "ok"}
        return {"status": "ok", "models": {m.id: m.worker.state() for m in models}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{**model_card(m.id, m.created), "role": m.role} for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        served = pick(model_id)
        return {**model_card(served.id, served.created), "role": served.role}

    def budget(served: ServedModel, ids: list[int], requested: int | None) -> int:
        """max_tokens capped at what the context (or the cache budget) leaves: the answer then
        ends with finish_reason "length", as one that reached the asked number does."""
        room = served.context - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; {served.id} takes at most {served.context} "
                                "(its context, or --max-cache-tokens)", param="messages", code="context_length_exceeded")
        return min(requested or DEFAULT_MAX_TOKENS, room)

    def sampling(body) -> Sampling:
        return Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: HttpRequest):
        served = pick(body.model)
        if body.n != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        messages = [{"role": "system" if m.role in ("system", "developer") else m.role, "content": m.text()}
                    for m in body.messages]
        tokenizer = served.loaded.tokenizer
        try:  # off the event loop: a long conversation takes seconds to tokenize
            ids = await asyncio.to_thread(encode_conversation, served.style, messages, tokenizer)
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        generation = _Generation(served, ids, budget(served, ids, body.max_completion_tokens or body.max_tokens),
                                 sampling(body), set(served.style.stop_ids(tokenizer)),
                                 [*served.style.stop_strings, *body.stop_strings()], http_request)
        return await _respond(generation, body, served, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: HttpRequest):
        served = pick(body.model)
        if body.n != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        scoring = body.echo or body.logprobs is not None
        if body.stream and (scoring or len(body.prompts()) != 1):
            raise ApiError(400, "stream takes one prompt, without logprobs or echo", param="stream")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be at least 1 (0 only with echo: the prompt scored, nothing written)",
                           param="max_tokens")
        tokenizer = served.loaded.tokenizer
        prompts = [await asyncio.to_thread(tokenizer.encode, prompt) if isinstance(prompt, str)
                   else _known_ids(prompt, served) for prompt in body.prompts()]
        if not scoring and len(prompts) == 1:
            generation = _Generation(served, prompts[0], budget(served, prompts[0], body.max_tokens), sampling(body),
                                     set(tokenizer.eos_ids), body.stop_strings(), http_request)
            return await _respond(generation, body, served, chat=False)
        # Several prompts, or log-probabilities: decoded together (the worker batches them), answered at once.
        answers = await asyncio.gather(*(_scored_answer(served, body, prompt, ids, http_request)
                                         for prompt, ids in zip(body.prompts(), prompts)))
        choices = [{"index": index, **choice} for index, (choice, _) in enumerate(answers)]
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": served.id,
                "choices": choices, "usage": usage(sum(map(len, prompts)), sum(count for _, count in answers))}

    async def _scored_answer(served: ServedModel, body: CompletionRequest, prompt: str | list[int], ids: list[int],
                             http_request: HttpRequest) -> tuple[dict, int]:
        """One prompt's choice (text, finish_reason, logprobs) and its number of new tokens."""
        tokenizer = served.loaded.tokenizer
        text, new_ids, finish_reason, ended_by = "", [], "length", None
        if body.max_tokens:
            generation = _Generation(served, ids, budget(served, ids, body.max_tokens), sampling(body),
                                     set(tokenizer.eos_ids), body.stop_strings(), http_request)
            text = await generation.text()
            new_ids, finish_reason = list(generation.stream.ids), generation.finish_reason
            ended_by = None if generation.stream.stopped else generation.request.stop_token
        elif len(ids) > served.context:
            budget(served, ids, 1)  # the context check, in its one shape
        prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
        logprobs = None
        if body.logprobs is not None or body.echo:
            # The stop token that ended the answer is no text, but it was generated, so it is listed:
            # lm-eval reads token_logprobs[ctxlen:-1], dropping the one token that max_tokens 1
            # generates whichever it is; without it, a continuation the model would end there lost
            # its last token's log-probability (SmolLM2 scoring " Opinion-based.": -24.2, not -27.4;
            # llama-cpp-python#1528 is the same bug).
            scored = [*ids, *new_ids, *([] if ended_by is None else [ended_by])]
            chosen, tops = await asyncio.to_thread(token_logprobs, served.loaded.model, scored, body.logprobs or 0)
            first = 0 if body.echo else len(ids)
            if body.logprobs is not None:
                logprobs = openai_logprobs(tokenizer, scored[first:], chosen[first:], tops[first:])
        return {"text": prompt_text + text if body.echo else text, "logprobs": logprobs,
                "finish_reason": finish_reason}, len(new_ids)

    # lm-evaluation-harness's `local-completions` reads the model's tokenizer from these (its
    # "remote" tokenizer backend), so log-likelihood tasks need no tokenizer download. The first
    # served model's tokenizer answers (or the one a request's "model" names).
    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None):
        served = pick(model) if model else models[0]
        tokenizer = served.loaded.tokenizer
        return {"eos_token": tokenizer.eos_text, "bos_token": tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else None,
                "pad_token": tokenizer.decode([tokenizer.pad_id]), "model_max_length": served.context, "model": served.id}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        served = pick(body.model) if body.model else models[0]
        ids = await asyncio.to_thread(served.loaded.tokenizer.encode, body.prompt, add_bos=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        served = pick(body.model) if body.model else models[0]
        return {"prompt": served.loaded.tokenizer.decode(_known_ids(body.tokens, served))}

    async def _respond(generation: _Generation, body, served: ServedModel, *, chat: bool):
        completion_id = new_id("chatcmpl" if chat else "cmpl")
        created = now()
        if not body.stream:
            text = await generation.text()
            choice = {"index": 0, "logprobs": None, "finish_reason": generation.finish_reason}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return {"id": completion_id, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": served.id, "choices": [choice],
                    "usage": usage(generation.prompt_tokens, generation.completion_tokens)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_or_text, finish_reason=None) -> dict:
            choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
            choice |= {"delta": delta_or_text} if chat else {"text": delta_or_text}
            payload = {"id": completion_id, "object": kind, "created": created, "model": served.id, "choices": [choice]}
            return payload | ({"usage": None} if include_usage else {})

        async def events():
            if chat:
                yield _sse(chunk({"role": "assistant", "content": ""}))
            try:
                async for piece in generation.pieces():
                    yield _sse(chunk({"content": piece} if chat else piece))
            except Exception as exc:
                error = ApiError(500, f"generation failed mid-stream: {type(exc).__name__}: {exc}", kind="server_error")
                yield _sse(error.body())
                return
            yield _sse(chunk({} if chat else "", generation.finish_reason))
            if include_usage:
                yield _sse({"id": completion_id, "object": kind, "created": created, "model": served.id, "choices": [],
                            "usage": usage(generation.prompt_tokens, generation.completion_tokens)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/")
    async def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


def serve(models: list[ServedModel], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_cache_tokens: int | None = DEFAULT_MAX_CACHE_TOKENS,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, allowed_hosts: list[str] = ()) -> None:
    """Bind, say where (one line, so --port 0 is usable), serve until interrupted."""
    import socket

    import uvicorn

    for served in models:
        served.start(max_batch, max_cache_tokens)
    app = create_app(models, api_key=api_key, hosts=HostCheck(host, list(allowed_hosts)), max_request_bytes=max_request_bytes)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening before the line below says so: a client that reads it connects into the backlog
        # even while uvicorn is still starting (slower while the decode step compiles in the background).
        sock.listen(2048)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    bound_port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    print(f"instructkit serve: listening on http://{url_host}:{bound_port} (models: {', '.join(m.id for m in models)})",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        for served in models:
            served.worker.stop()
