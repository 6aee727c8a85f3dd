"""Beam search against HF transformers' own (`generate(num_beams=K, length_penalty=A)`), on the real
default model exported to the HF format; its rows do not depend on the batch; respond records it."""

import json

import pytest
import torch

from instructkit.data.prompts import get_prompt_style
from instructkit.decode.beam import beam_search
from instructkit.decode.generate import generate
from instructkit.export import export_model
from instructkit.models.registry import load_model

from .conftest import require_module, run_cli

transformers = require_module("transformers")

TEXTS = ["The capital of France is", "List three colors:", "Once upon a time", "def fib(n):",
         "Rewrite the sentence in passive voice: The cat ate the fish."]


@pytest.fixture(scope="module")
def gemma_and_hf(tmp_path_factory):
    loaded = load_model("gemma-3-270m")
    folder = tmp_path_factory.mktemp("beam") / "hf"
    export_model(loaded, get_prompt_style("gemma"), "hf", folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return loaded, reference


def _stops(tokenizer) -> list[int]:
    # A period and a newline end hypotheses early, so the finished pool and HF's stopping
    # heuristic are exercised, not only the token budget.
    return [tokenizer.eos_id, tokenizer.encode(".", add_bos=False)[0], tokenizer.encode("\n", add_bos=False)[0]]


@pytest.mark.parametrize("beams, length_penalty", [(4, 1.0), (3, 0.0), (5, 2.0)])
def test_beam_search_matches_transformers_token_for_token(gemma_and_hf, beams, length_penalty):
    loaded, reference = gemma_and_hf
    tokenizer, stops = loaded.tokenizer, _stops(loaded.tokenizer)
    prompts = [tokenizer.encode(text) for text in TEXTS]
    ours = beam_search(loaded.model, tokenizer, prompts, beams=beams, length_penalty=length_penalty, max_new_tokens=24,
                       stop_ids=stops)
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), num_beams=beams, length_penalty=length_penalty,
                                        max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=0,
                                        early_stopping=False)[0, len(prompt):].tolist()
        if theirs and theirs[-1] in stops:  # HF keeps the stop token; ours leaves it out
            theirs = theirs[:-1]
        assert result.token_ids == theirs, tokenizer.decode(prompt)
    assert any(result.finish_reason == "stop_token" for result in ours)
    greedy = generate(loaded.model, tokenizer, prompts, max_new_tokens=24, stop_ids=stops)
    assert [g.token_ids for g in greedy] != [r.token_ids for r in ours], "beam search found nothing greedy did not"


def test_beam_search_rows_do_not_depend_on_the_batch(gemma_and_hf):
    loaded, _ = gemma_and_hf
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(text) for text in TEXTS]
    together = beam_search(loaded.model, tokenizer, prompts, beams=3, max_new_tokens=16, stop_ids=_stops(tokenizer),
                           repeat_stop=4)
    alone = beam_search(loaded.model, tokenizer, prompts, beams=3, max_new_tokens=16, stop_ids=_stops(tokenizer),
                        repeat_stop=4, prompt_batch=1)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]


def test_respond_with_beams_records_them_and_refuses_a_mixed_rerun(chapter_data_path, tmp_path):
    out = tmp_path / "responses.json"
    args = ["respond", "--model", "tiny-gemma3", "--data", str(chapter_data_path), "--split", "val", "--out", str(out),
            "--max-new-tokens", "6"]
    result = run_cli(*args, "--beams", "2", "--length-penalty", "0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert {json.dumps(row["settings"], sort_keys=True) for row in rows} == {json.dumps(
        {"model": "tiny-gemma3", "prompt_style": "gemma", "max_new_tokens": 6, "shots": 0, "beams": 2,
         "length_penalty": 0.5}, sort_keys=True)}
    evaluated = run_cli("evaluate", "--responses", str(out), "--out", str(tmp_path / "evaluation"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "(beam search, 2 beams, length penalty 0.5; at most 6 new tokens)" in (tmp_path / "evaluation" / "report.md").read_text()
    greedy_rerun = run_cli(*args)  # the same file, other decoding: refused, nothing rewritten
    assert greedy_rerun.returncode != 0 and "other settings" in greedy_rerun.stderr
    assert len(greedy_rerun.stderr.strip().splitlines()) == 1
    for bad, message in ((["--beams", "0"], "--beams must be"), (["--beams", "2", "--few-shot", "2"], "does not combine")):
        refused = run_cli(*args[:-4], "--out", str(tmp_path / "other.json"), *bad)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "other.json").exists() and not (tmp_path / "other.jsonl").exists()
