"""`instructkit serve` checked with OpenAI's own Python client and types, against a real uvicorn
on 127.0.0.1."""

import concurrent.futures
import json
import threading
import time

import httpx
import pytest
import torch

from instructkit.data.prompts import get_prompt_style
from instructkit.decode.generate import TextStream, generate
from instructkit.models.registry import load_model

from .conftest import require_module, run_cli
from .serve_helpers import running_server

openai = require_module("openai")
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from openai.types.completion import Completion  # noqa: E402

GEMMA = get_prompt_style("gemma")
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-gemma3")


@pytest.fixture(scope="module")
def server():
    with running_server("--model", "tiny-gemma3", "--prompt-style", "gemma", "--threads", "2", "--quantize", "none") as (url, process, output):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def ours(tiny, messages, max_tokens, stop_strings=()):
    ids = tiny.tokenizer.encode(GEMMA.conversation(messages))
    stops = GEMMA.stop_ids(tiny.tokenizer)
    result = generate(tiny.model, tiny.tokenizer, [ids], max_new_tokens=max_tokens, stop_ids=stops,
                      stop_strings=[*GEMMA.stop_strings, *stop_strings])[0]
    return ids, result


def sse_payloads(url, body, headers=None):
    with httpx.stream("POST", url, json=body, headers=headers or {}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                yield line[6:]


def test_models_list_retrieve_and_404(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["tiny-gemma3"] and listed.data[0].object == "model"
    assert client.models.retrieve("tiny-gemma3").owned_by == "instructkit"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_chat_at_temperature_0_equals_our_generate_on_the_style_rendering(client, tiny):
    """The template is applied exactly once: the server's answer is our engine's on
    GEMMA.conversation(messages)."""
    ids, expected = ours(tiny, QUESTION, 24)
    reply = client.chat.completions.create(model="tiny-gemma3", messages=QUESTION, temperature=0, max_tokens=24)
    ChatCompletion.model_validate(reply.model_dump())
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")


def test_streamed_chunks_are_valid_and_join_to_the_same_text(server, client):
    body = {"model": "tiny-gemma3", "messages": QUESTION, "temperature": 0, "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}
    payloads = list(sse_payloads(server + "/v1/chat/completions", body))
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    content, usage_chunk = chunks[:-1], chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 30
    assert all(c.choices[0].finish_reason is None for c in content[:-1]) and content[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1 and all(c.model == "tiny-gemma3" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in content)
    whole = client.chat.completions.create(model="tiny-gemma3", messages=QUESTION, temperature=0, max_tokens=30)
    assert streamed == whole.choices[0].message.content and len(content) > 3
    # Through the client's own streaming too.
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-gemma3", messages=QUESTION, temperature=0, max_tokens=30, stream=True) if c.choices]
    assert "".join(pieces) == streamed


def test_completions_pass_the_prompt_raw(client, tiny):
    prompt = "  leading spaces\n\ttab ünïcödé 😀 <start_of_turn> as text"
    expected = generate(tiny.model, tiny.tokenizer, [tiny.tokenizer.encode(prompt)], max_new_tokens=12,
                        stop_ids=[tiny.tokenizer.eos_id])[0]
    reply = client.completions.create(model="tiny-gemma3", prompt=prompt, temperature=0, max_tokens=12)
    Completion.model_validate(reply.model_dump())
    assert reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == len(tiny.tokenizer.encode(prompt))


def test_stop_strings_cut_and_never_leak_into_deltas(server, client, tiny):
    _, free = ours(tiny, QUESTION, 40)
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop in text
    reply = client.chat.completions.create(model="tiny-gemma3", messages=QUESTION, temperature=0, max_tokens=40, stop=[stop])
    assert reply.choices[0].message.content == text[: text.index(stop)] and reply.choices[0].finish_reason == "stop"
    body = {"model": "tiny-gemma3", "messages": QUESTION, "temperature": 0, "max_tokens": 40, "stream": True, "stop": stop}
    deltas = [json.loads(p)["choices"][0]["delta"].get("content", "") for p in sse_payloads(server + "/v1/chat/completions", body)
              if p != "[DONE]"]
    assert "".join(deltas) == text[: text.index(stop)]


def test_text_stream_never_splits_a_character_or_shows_a_partial_stop(tiny):
    tokenizer = tiny.tokenizer
    emoji_bytes = [tokenizer.token_id(f"<0x{b:02X}>") or tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    assert None not in emoji_bytes
    cjk = tokenizer.encode("你好世界", add_bos=False)
    stream = TextStream(tokenizer, ["END"])
    pieces = [stream.push(token) for token in emoji_bytes + cjk + tokenizer.encode(" the EN", add_bos=False)]
    assert pieces[:3] == ["", "", ""] and pieces[3] == "😀" and "\ufffd" not in "".join(pieces)
    assert not "".join(pieces).endswith("EN")  # might still become END: held back
    for token in tokenizer.encode("D of it", add_bos=False):
        pieces.append(stream.push(token))
    assert "".join(pieces) == "😀你好世界 the " and stream.stopped


def test_bad_requests_get_openai_shaped_errors(server):
    def post(path, body):
        response = httpx.post(server + path, json=body, timeout=60)
        return response.status_code, response.json()["error"]

    status, error = post("/v1/chat/completions", {"model": "tiny-gemma3", "messages": QUESTION, "n": 2})
    assert status == 400 and error["param"] == "n" and set(error) == {"message", "type", "param", "code"}
    assert post("/v1/chat/completions", {"model": "nope", "messages": QUESTION})[0] == 404
    assert post("/v1/chat/completions", {"model": "tiny-gemma3"})[0] == 422
    status, error = post("/v1/chat/completions", {"model": "tiny-gemma3", "messages": QUESTION, "temperature": 7})
    assert status == 422 and error["param"] == "temperature"
    status, error = post("/v1/chat/completions", {"model": "tiny-gemma3", "messages": [{"role": "assistant", "content": "x"}]})
    assert status == 400 and "end with a user message" in error["message"]
    body = {"model": "tiny-gemma3", "messages": QUESTION, "unknown_field": {"ignored": True}, "max_tokens": 2}
    assert httpx.post(server + "/v1/chat/completions", json=body, timeout=60).status_code == 200


@pytest.fixture(scope="module")
def real_server():
    """The real default model: ~10 tokens/s at batch 1, slow enough to watch a generation stop."""
    with running_server("--model", "gemma-3-270m", "--prompt-style", "gemma", "--threads", "2", "--quantize", "none") as (url, _, _):
        yield url


@pytest.mark.slow
def test_a_client_that_goes_away_stops_its_generation(real_server):
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Write a long story about the sea."}],
            "temperature": 0, "max_tokens": 300, "stream": True, "stop": []}
    busy = lambda: httpx.get(real_server + "/health").json()["models"]["gemma-3-270m"]["busy_rows"]  # noqa: E731
    with httpx.stream("POST", real_server + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            if len(lines) > 7:  # the role chunk and 3 tokens, each event followed by a blank line
                break
        # What the stream held, if the row is not there: an error event or an early finish says why.
        assert busy() == 1, [line[:300] for line in lines if line]
    gone = time.perf_counter()
    while busy() and time.perf_counter() - gone < 10:
        time.sleep(0.01)
    # One decode step of this model is ~0.1 s; the row must leave within about that (plus polling).
    assert busy() == 0 and time.perf_counter() - gone < 1.0


def test_health_and_models_answer_while_generating(server):
    body = {"model": "tiny-gemma3", "messages": QUESTION, "temperature": 0, "max_tokens": 400}
    worker = threading.Thread(target=lambda: httpx.post(server + "/v1/chat/completions", json=body, timeout=120))
    worker.start()
    time.sleep(0.3)
    for path in ("/health", "/v1/models"):
        started = time.perf_counter()
        assert httpx.get(server + path, timeout=5).status_code == 200
        assert time.perf_counter() - started < 1.0
    worker.join()


def _concurrent_answers(url, model, questions, max_tokens):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)

    def ask(question):
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=max_tokens, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    alone = [ask(question) for question in questions]
    return together, alone


QUESTIONS = ["Name a fruit.", "What is 2 + 2?", "Say hello in French.", "Give a color.", "Name a planet.",
             "What is the capital of Spain?", "Count to three.", "Name an animal that barks."]


def test_eight_concurrent_streams_each_get_their_single_client_answer(server):
    together, alone = _concurrent_answers(server, "tiny-gemma3", QUESTIONS, 24)
    assert together == alone and all(together)


@pytest.mark.slow
def test_eight_concurrent_streams_on_the_real_default_model(real_server):
    together, alone = _concurrent_answers(real_server, "gemma-3-270m", QUESTIONS, 16)
    assert together == alone and all(together)


def test_api_key_guards_the_api_but_not_health(tmp_path):
    secret = "s3cr3t-key-for-test"
    with running_server("--model", "tiny-gemma3", "--prompt-style", "gemma", "--api-key-env", "IK_TEST_KEY",
                        env={"IK_TEST_KEY": secret}) as (url, process, output):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
        assert good.chat.completions.create(model="tiny-gemma3", messages=QUESTION, max_tokens=2).choices
    assert secret not in "".join(output) + process.stderr.read()


def test_serve_refuses_a_model_without_a_prompt_style():
    result = run_cli("serve", "--model", "tiny-gemma3", "--port", "0")
    assert result.returncode == 2 and "has no saved prompt style; pass --prompt-style" in result.stderr


def test_a_failure_mid_stream_is_an_error_event(tiny):
    """A model whose forward pass fails after a few steps (injected; the server is real uvicorn)."""
    import socket

    import uvicorn

    from instructkit.serve.app import ServedModel, create_app

    class Failing(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.config, self.lm_head, self.calls = model, model.config, model.lm_head, 0

        def new_cache(self, *args, **kwargs):
            return self.inner.new_cache(*args, **kwargs)

        def head(self, hidden):
            return self.inner.head(hidden)

        def forward(self, *args, **kwargs):
            self.calls += 1
            if self.calls > 4:
                raise RuntimeError("injected failure")
            return self.inner(*args, **kwargs)

    broken = type(tiny)(Failing(tiny.model), tiny.tokenizer, "broken", tiny.tokenizer_ref)
    served = ServedModel("broken", broken, GEMMA, "model").start(4)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app([served]), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="injected failure"):
            for _ in client.chat.completions.create(model="broken", messages=QUESTION, max_tokens=50, stream=True):
                pass
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        served.worker.stop()
