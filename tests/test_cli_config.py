"""The training commands' flags come from the config dataclasses, and recipe files (`--config`)
load the same configs: a run folder's recipe.yaml repeats its run bit for bit, and the main job's
shipped recipes are exactly the Python recipe they replaced."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json

import pytest

from instructkit.cli import build_parser
from instructkit.cli.train import DPO_NO_FLAG, DPO_OWN_FLAGS, FINETUNE_NO_FLAG, FINETUNE_OWN_FLAGS
from instructkit.main_job import MainJob
from instructkit.train.config import DPOConfig, TrainConfig

from .conftest import run_cli

# main_job.main_recipe() of commit dac1825 (the last with the recipe as Python literals), for the
# built-in data and for the chapter's, as TrainConfig.to_dict() gave them; with the conversation
# settings added since (format, columns, train_on) and the memory settings (base_quantize,
# checkpoint_activations, packing, pack_length) at their defaults, which change nothing for
# Alpaca records; the built-in data's epochs since chosen anew (1 -> 3, docs/BENCHMARKS.md).
FORMER_BUILTIN = {
    "data": "builtin", "out": "runs/builtin", "epochs": 3, "max_steps": None, "batch_size": 8, "grad_accum": 1,
    "lr": 0.0001, "weight_decay": 0.1, "warmup": 10, "schedule": "cosine", "clip": 1.0, "eval_every": 58,
    "eval_batches": 7, "early_stop": None, "seed": 123, "prompt_style": None, "max_length": None,
    "skip_invalid": False, "batching": "grouped", "lora_rank": 0, "lora_alpha": 16.0,
    "lora_targets": ["attention", "mlp"], "base_quantize": "none", "freeze_embedding": True,
    "checkpoint_activations": False, "save_every": 58, "threads": None, "memory_limit": None,
    "device": "auto", "precision": "fp32", "strategy": "ddp", "log": None, "model": "gemma-3-270m",
    "mask_instructions": True, "format": "auto", "columns": None, "train_on": None, "shuffle_seed": None,
    "group_near_duplicates": False, "packing": False, "pack_length": None, "sample_prompt": True, "data_sha256": None,
}
FORMER_CHAPTER = {**FORMER_BUILTIN, "data": "../shared/data/instruction-data.json", "out": "runs/instruction-data",
                  "epochs": 2, "lr": 0.0005, "lora_rank": 16, "lora_alpha": 32.0}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("command, cls, no_flag, own", [("finetune", TrainConfig, FINETUNE_NO_FLAG, FINETUNE_OWN_FLAGS),
                                                        ("dpo", DPOConfig, DPO_NO_FLAG, DPO_OWN_FLAGS)])
def test_every_config_field_has_a_flag_and_every_flag_a_field(command, cls, no_flag, own):
    names = {field.name for field in dataclasses.fields(cls)}
    flags = {action.dest for action in _subparser(command)._actions if action.dest != "help"}
    assert set(no_flag) <= names  # a field left without a flag still exists
    assert flags - set(own) == names - set(no_flag), "a field without a flag, or a flag without a field"


def test_finetune_help_shows_every_field_once_with_the_dataclass_default():
    text = run_cli("finetune", "--help").stdout
    settings = text[text.index("settings (TrainConfig"):]
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        count = sum(line.split()[0].rstrip(",") == flag for line in settings.splitlines() if line.strip())
        assert count == (0 if field.name in FINETUNE_NO_FLAG else 1), flag
    assert "peak learning rate (default: 5e-05)" in " ".join(settings.split())
    assert "(default: attention,mlp)" in settings and "--no-sample-prompt" in settings
    assert "Fields without a flag: data_sha256:" in settings  # the one field finetune records itself


def test_flags_are_absent_unless_given():
    args = build_parser().parse_args(["finetune", "--lr", "1e-3", "--no-mask-instructions", "--lora-targets", "mlp, a"])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    assert given == {"lr": 1e-3, "mask_instructions": False, "lora_targets": ["mlp", "a"]}


def test_a_run_folders_recipe_repeats_the_run_bit_for_bit(chapter_data_path, tmp_path):
    first, second = tmp_path / "R1", tmp_path / "R2"
    made = run_cli("finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--out", str(first),
                   "--max-steps", "3", "--eval-every", "3", "--eval-batches", "1", "--no-sample-prompt", "--lr", "1e-3",
                   "--lora-rank", "2", "--batch-size", "4", "--shuffle-seed", "7")
    assert made.returncode == 0, made.stderr
    again = run_cli("finetune", "--config", str(first / "recipe.yaml"), "--out", str(second))
    assert again.returncode == 0, again.stderr
    digests = [hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest() for run in (first, second)]
    assert digests[0] == digests[1]
    configs = [json.loads((run / "config.json").read_text()) for run in (first, second)]
    assert {**configs[0], "out": None} == {**configs[1], "out": None} and configs[1]["lora_rank"] == 2


def test_a_dpo_run_folders_recipe_repeats_it_bit_for_bit(chapter_data_path, shared_data, tmp_path):
    sft, first, second = tmp_path / "sft", tmp_path / "A", tmp_path / "B"
    assert run_cli("finetune", "--model", "tiny-gpt2", "--data", str(chapter_data_path), "--out", str(sft),
                   "--max-steps", "1", "--eval-batches", "1", "--no-sample-prompt").returncode == 0
    made = run_cli("dpo", "--run", str(sft), "--data", str(shared_data / "instruction-data-with-preference.json"),
                   "--out", str(first), "--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
                   "--lora-rank", "2", "--beta", "0.2")
    assert made.returncode == 0, made.stderr[-2000:]
    assert "method: dpo" in (first / "recipe.yaml").read_text()
    again = run_cli("dpo", "--config", str(first / "recipe.yaml"), "--out", str(second))
    assert again.returncode == 0, again.stderr[-2000:]
    digests = [hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest() for run in (first, second)]
    assert digests[0] == digests[1]
    assert json.loads((second / "config.json").read_text())["beta"] == 0.2


def test_flags_override_the_recipe_file_and_toml_reads_the_same(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('data = "builtin:150"\nlr = 3e-4\nepochs = 1\nlora_targets = ["mlp"]\n')
    yaml = tmp_path / "r.yaml"
    yaml.write_text("data: builtin:150\nlr: 3e-4\nepochs: 1\nlora_targets: mlp\n")  # YAML 1.1 reads 3e-4 as text
    for path in (toml, yaml):
        job = MainJob(config=str(path), train={"epochs": 2})
        recipe = job.recipe()
        assert (recipe.lr, recipe.epochs, recipe.lora_targets, recipe.data) == (3e-4, 2, ["mlp"], "builtin:150")
        assert recipe.out == "runs/builtin-150" and recipe.eval_every == 58  # the shipped recipe under the file


@pytest.mark.parametrize("command", ["finetune", "dpo", "run"])
def test_an_unknown_recipe_key_is_one_line_naming_the_file_and_key(command, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x.json\nout: R\nlearning_rate: 0.1\n")
    result = run_cli(command, "--config", str(bad), "--model", "tiny-gpt2", "--out", str(tmp_path / "R"))
    assert result.returncode == 2 and not (tmp_path / "R").exists()
    assert result.stderr.strip().splitlines() == [
        f"instructkit: error: {bad}: unknown key 'learning_rate' (not a setting of "
        f"{'DPOConfig' if command == 'dpo' else 'TrainConfig'})"]


def test_a_wrong_value_in_a_recipe_is_one_line_and_dpo_refuses_the_main_jobs_section(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "x.json"\nout = "R"\nepochs = "two"\n')
    result = run_cli("finetune", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == f"instructkit: error: {bad}: epochs: expected an integer, got 'two'"
    section = tmp_path / "main.yaml"
    section.write_text("responses:\n  beams: 4\n")
    refused = run_cli("dpo", "--config", str(section), "--model", "tiny-gpt2", "--data", "p.json", "--out", "R")
    assert refused.returncode == 2 and "unknown key 'responses'" in refused.stderr


def test_the_shipped_recipes_are_the_former_python_recipe_field_by_field():
    for data, out, expected, beams in (("builtin", "runs/builtin", FORMER_BUILTIN, 1),
                                       ("../shared/data/instruction-data.json", "runs/instruction-data", FORMER_CHAPTER, 4)):
        job = MainJob(train={"data": data})
        loaded = job.recipe().to_dict()
        assert list(loaded) == list(expected)
        for name, value in expected.items():
            assert loaded[name] == value and type(loaded[name]) is type(value), name
        assert job.chosen_beams() == beams
    # What `make run` builds: the default data, its folder named after it.
    assert MainJob().recipe().to_dict() == FORMER_BUILTIN
