"""lm-evaluation-harness against `instructkit serve`: `/v1/completions` with `logprobs` and `echo`
(checked with OpenAI's client types), the tokenizer routes lm-eval's `local-completions` reads,
and lm-eval itself running a multiple-choice task written from the chapter's test split and a
generation task through `local-chat-completions`; the log-probabilities lm-eval receives equal
our model's own."""

from __future__ import annotations

import json
import random

import pytest
import torch

from instructkit.data.prompts import get_prompt_style
from instructkit.models.registry import load_model

from .conftest import require_module
from .serve_helpers import app_server

openai = require_module("openai")
lm_eval = require_module("lm_eval")
from openai.types.completion import Completion  # noqa: E402


def _serve(loaded, style: str):
    from instructkit.serve.app import ServedModel

    return app_server([ServedModel("tiny", loaded, get_prompt_style(style), "model").start(4)])


@pytest.fixture(scope="module")
def served():
    loaded = load_model("tiny-gemma3", seed=3)
    with _serve(loaded, "alpaca") as url:
        yield url, loaded


@pytest.fixture(scope="module")
def served_real():
    """SmolLM2-135M-Instruct, real weights (served as "tiny" too): the size users run."""
    loaded = load_model("smollm2-135m-instruct")
    with _serve(loaded, "chatml") as url:
        yield url, loaded


def own_logprobs(loaded, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, by our model directly (the full logits, one pass)."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return [float(logits[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_echo_and_logprobs_with_openai_client(served):
    url, loaded = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    ids = loaded.tokenizer.encode("The quick brown fox jumps")
    completion = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=1, echo=True, logprobs=3,
                                           temperature=0)
    assert isinstance(completion, Completion) and [c.index for c in completion.choices] == [0, 1]
    first = completion.choices[0].logprobs
    assert len(first.tokens) == len(ids) + 1 and first.token_logprobs[0] is None and first.top_logprobs[0] is None
    assert first.token_logprobs[1:len(ids)] == pytest.approx(own_logprobs(loaded, ids), abs=1e-4)
    # The generated token is the greedy one: its log-probability is the largest of its position.
    assert first.token_logprobs[-1] == max(first.top_logprobs[-1].values())
    assert all(len(top) <= 3 for top in first.top_logprobs[1:])
    assert completion.choices[0].text.startswith(loaded.tokenizer.decode(ids))
    # Without echo: only the new tokens; text prompts work the same.
    plain = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, logprobs=0, temperature=0)
    assert len(plain.choices[0].logprobs.token_logprobs) == plain.usage.completion_tokens


def test_bad_scoring_requests_are_refused_in_openai_shape(served):
    import httpx

    url, _ = served
    for body, param in [({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": [10**9], "max_tokens": 1}, "prompt"),
                        ({"prompt": "x", "stream": True, "logprobs": 1}, "stream")]:
        reply = httpx.post(f"{url}/v1/completions", json={"model": "tiny", **body})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_tokenizer_routes(served):
    import httpx

    url, loaded = served
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == loaded.tokenizer.eos_text
    tokens = httpx.post(f"{url}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert tokens == [loaded.tokenizer.eos_id]
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"]
    assert ids == loaded.tokenizer.encode("Hello world", add_bos=False)
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"


def _write_task(folder, chapter_data_path) -> list[dict]:
    """A multiple-choice task from the chapter's test split: the right output against another
    entry's. Written as lm-eval reads any local task (dataset_path json, a YAML beside it)."""
    records = json.loads(chapter_data_path.read_text())
    test = records[int(len(records) * 0.9):][:6]
    rng = random.Random(0)
    docs = []
    for index, record in enumerate(test):
        other = test[(index + 1 + rng.randrange(len(test) - 1)) % len(test)]["output"]
        prompt = record["instruction"] + (f"\n{record['input']}" if record["input"] else "")
        docs.append({"question": prompt, "choices": [record["output"], other], "label": 0})
    (folder / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / "ik_mc.yaml").write_text(f"""task: ik_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    (folder / "ik_gen.yaml").write_text(f"""task: ik_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "docs.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""")
    return docs


def _lm_eval(folder, model: str, model_args: dict, task: str, monkeypatch, **options) -> dict:
    """lm-eval's simple_evaluate on one of our local tasks, offline, every sample logged."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args={"model": "tiny", "num_concurrent": 1, "max_retries": 1, **model_args},
                           tasks=[task], task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                           log_samples=True, **options)


@pytest.mark.parametrize("which", ["served", "served_real"])
def test_lm_eval_local_completions_log_likelihoods_equal_ours(which, request, tmp_path, chapter_data_path, monkeypatch):
    """lm-eval's own `local-completions` model, with its remote tokenizer (our /tokenize), on a
    multiple-choice task: every log-likelihood it received equals our model's own within 1e-4,
    on a tiny random model and on SmolLM2-135M-Instruct's real weights."""
    url, loaded = request.getfixturevalue(which)
    docs = _write_task(tmp_path, chapter_data_path)
    results = _lm_eval(tmp_path, "local-completions", {"base_url": f"{url}/v1/completions", "tokenizer_backend": "remote",
                                                        "batch_size": 2}, "ik_mc", monkeypatch)
    assert 0.0 <= results["results"]["ik_mc"]["acc,none"] <= 1.0
    samples = results["samples"]["ik_mc"]
    assert len(samples) == len(docs)
    encode = lambda text: loaded.tokenizer.encode(text, add_bos=False)  # noqa: E731 - what /tokenize answers
    for sample in samples:
        context = f"{sample['doc']['question']}\nAnswer:"
        for choice, response in zip(sample["doc"]["choices"], sample["resps"]):
            whole, context_ids = encode(context + " " + choice), encode(context)
            ours = sum(own_logprobs(loaded, whole)[len(context_ids) - 1:])
            assert response[0][0] == pytest.approx(ours, abs=1e-4)


def test_lm_eval_local_chat_completions_generates(served, tmp_path, chapter_data_path, monkeypatch):
    url, _ = served
    docs = _write_task(tmp_path, chapter_data_path)
    results = _lm_eval(tmp_path, "local-chat-completions", {"base_url": f"{url}/v1/chat/completions"}, "ik_gen",
                       monkeypatch, apply_chat_template=True)
    samples = results["samples"]["ik_gen"]
    assert len(samples) == len(docs)
    assert all(isinstance(sample["resps"][0][0], str) for sample in samples)
    assert "exact_match,none" in results["results"]["ik_gen"]
