"""The one loader (decode/load.py): the prompt-style rule written once, --run vs --model, and a
run folder given as a model spec keeping its saved style."""

from __future__ import annotations

import pytest

from instructkit.decode.load import load_for_talk, load_start, prompt_style_for, source_of
from instructkit.errors import UserError
from instructkit.models.registry import load_model

from .conftest import run_cli


@pytest.fixture(scope="module")
def phi3_run(tmp_path_factory, chapter_data_path):
    """A finished tiny GPT-2 run trained in the phi3 style (its family's default is alpaca)."""
    out = tmp_path_factory.mktemp("loader") / "run"
    result = run_cli("finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--out", str(out),
                     "--max-steps", "1", "--prompt-style", "phi3", "--no-sample")
    assert result.returncode == 0, result.stderr
    return out


def test_the_prompt_style_rule_explicit_then_saved_then_the_familys(phi3_run):
    ready = load_start(str(phi3_run))
    assert ready.run is not None and ready.style.name == "phi3"  # the run's saved style
    assert prompt_style_for(ready.loaded, ready.run, "gemma").name == "gemma"  # explicit wins
    bare = load_start("tiny-gpt2")
    assert bare.run is None and bare.style.name == "alpaca"  # the family's default
    with pytest.raises(UserError, match="has no saved prompt style; pass --prompt-style"):
        prompt_style_for(bare.loaded, None, None, strict=True)
    assert prompt_style_for(ready.loaded, ready.run, None, strict=True).name == "phi3"
    smollm2 = load_model("smollm2-135m-instruct")  # an instruct model's own template is no guess
    assert prompt_style_for(smollm2, None, None, strict=True).chat_template == smollm2.chat_template


def test_a_run_folder_given_as_model_is_the_run(phi3_run):
    spec, run = source_of(None, str(phi3_run))
    assert run is not None and run.path == phi3_run and spec == str(phi3_run)
    ready = load_for_talk(model=str(phi3_run), strict_style=True, quantize="none")
    assert ready.style.name == "phi3" and ready.run is not None
    with pytest.raises(UserError, match="exactly one of --run RUN_DIR or --model SPEC"):
        source_of(str(phi3_run), "tiny-gpt2", "serve")
    with pytest.raises(UserError, match="exactly one of"):
        source_of(None, None, "chat")


def test_an_unfinished_run_is_refused(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no fine-tuned model here"):
        load_for_talk(run=str(folder))
