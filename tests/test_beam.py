"""Beam search against HF transformers' own (`generate(num_beams=K, length_penalty=A)`); its rows do not
depend on the batch; respond records it.

Breadth (beam widths, length penalties, batch groupings, the repeat stop) runs on a tiny Gemma 3 with a
1,024-token vocabulary, built and randomly initialised by transformers and read by our HF-folder loader:
every step of a search on the real model reads its 262,144-way head once per beam row, so a real-size
case costs minutes. The property runs once at real size: the default model exported to the HF format,
with the main job's decoding (4 beams, length penalty 1.0); there our five prompts are searched in one
batch and HF's one at a time, so the real-size check is also that a row does not depend on its batch."""

import json
import shutil

import pytest
import torch

from instructkit.data.prompts import get_prompt_style
from instructkit.decode.beam import beam_search
from instructkit.decode.generate import generate
from instructkit.export import export_model
from instructkit.models.registry import embedded_gemma_folder, load_model

from .conftest import require_module, run_cli

transformers = require_module("transformers")

TEXTS = ["The capital of France is", "List three colors:", "Once upon a time", "def fib(n):",
         "Rewrite the sentence in passive voice: The cat ate the fish."]
TINY_VOCAB = 1024
TINY_STOPS = [1, 100, 200]  # eos and two ordinary tokens


@pytest.fixture(scope="module")
def gemma_and_hf(tmp_path_factory):
    loaded = load_model("gemma-3-270m")
    folder = tmp_path_factory.mktemp("beam") / "hf"
    export_model(loaded, get_prompt_style("gemma"), "hf", folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return loaded, reference


@pytest.fixture(scope="module")
def tiny_and_hf(tmp_path_factory):
    """(ours, HF's, prompts) for a 3-layer Gemma 3 (a 6-token window, a global layer every 3rd: both
    attention kinds) of random weights, its prompts random ids of five lengths (so a batch pads).
    The stop tokens' embedding rows are scaled by 2.5 (tied: so are their logits), so hypotheses end on
    them at many lengths, and the finished pool and the length penalty decide, as on the real model."""
    config = transformers.Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6, max_position_embeddings=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], initializer_range=0.05,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    reference = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        reference.get_input_embeddings().weight[TINY_STOPS] *= 2.5
    folder = tmp_path_factory.mktemp("beam") / "tiny-hf"
    reference.save_pretrained(folder)
    shutil.copy(embedded_gemma_folder() / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}))
    loaded = load_model(str(folder))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, TINY_VOCAB, (length,), generator=generator).tolist() for length in (5, 9, 3, 12, 7)]
    return loaded, reference, prompts


def _stops(tokenizer) -> list[int]:
    # A period and a newline end hypotheses early, so the finished pool and HF's stopping
    # heuristic are exercised, not only the token budget.
    return [tokenizer.eos_id, tokenizer.encode(".", add_bos=False)[0], tokenizer.encode("\n", add_bos=False)[0]]


def _assert_matches_transformers(loaded, reference, prompts, stops, beams, length_penalty):
    """Our batched search against HF's, one prompt at a time, token for token, and how each ended:
    HF keeps the stop token, ours leaves it out and says it stopped; 24 tokens is the budget."""
    tokenizer = loaded.tokenizer
    ours = beam_search(loaded.model, tokenizer, prompts, beams=beams, length_penalty=length_penalty, max_new_tokens=24,
                       stop_ids=stops)
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), num_beams=beams, length_penalty=length_penalty,
                                        max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=0,
                                        early_stopping=False)[0, len(prompt):].tolist()
        stopped = bool(theirs) and theirs[-1] in stops
        if stopped:
            theirs = theirs[:-1]
        assert result.token_ids == theirs, tokenizer.decode(prompt)
        assert result.finish_reason == ("stop_token" if stopped else "length"), tokenizer.decode(prompt)
    assert any(result.finish_reason == "stop_token" for result in ours)
    greedy = generate(loaded.model, tokenizer, prompts, max_new_tokens=24, stop_ids=stops)
    assert [g.token_ids for g in greedy] != [r.token_ids for r in ours], "beam search found nothing greedy did not"
    return ours


@pytest.mark.parametrize("beams, length_penalty", [(4, 1.0), (3, 0.0), (5, 2.0)])
def test_beam_search_matches_transformers_on_a_tiny_model(tiny_and_hf, beams, length_penalty):
    loaded, reference, prompts = tiny_and_hf
    _assert_matches_transformers(loaded, reference, prompts, TINY_STOPS, beams, length_penalty)


def test_beam_search_matches_transformers_token_for_token_on_the_real_model(gemma_and_hf):
    loaded, reference = gemma_and_hf
    prompts = [loaded.tokenizer.encode(text) for text in TEXTS]
    _assert_matches_transformers(loaded, reference, prompts, _stops(loaded.tokenizer), 4, 1.0)


@pytest.mark.parametrize("beams", [3, 4])
def test_beam_search_rows_do_not_depend_on_the_batch(tiny_and_hf, beams):
    """Searched all together, in pairs and one at a time, every prompt gets the same answer and the
    same ending. Stopping on eos alone, with the repeat stop, hypotheses end both ways."""
    loaded, _, prompts = tiny_and_hf
    tokenizer = loaded.tokenizer
    searches = {size: beam_search(loaded.model, tokenizer, prompts, beams=beams, max_new_tokens=16,
                                  stop_ids=[tokenizer.eos_id], repeat_stop=4, prompt_batch=size)
                for size in (len(prompts), 2, 1)}
    together = searches[len(prompts)]
    assert {r.finish_reason for r in together} >= {"repeat", "stop_token"}
    for size, results in searches.items():
        assert [r.token_ids for r in results] == [r.token_ids for r in together], size
        assert [r.finish_reason for r in results] == [r.finish_reason for r in together], size


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
