"""`instructkit finetune`: set up, run the loop with evaluation and checkpoints, write the run folder
(runs.py names its files).

A run folder belongs to one request: resuming (or rerunning the main job) compares the saved
config with the requested one, the data's sha256 included, and refuses any difference with one
line naming the settings. Every random draw comes from the run's seed (LoRA's A matrices, the
data order, dropout through the saved RNG state), so two runs with the same arguments give the
same weights, and a killed run resumes to them.
"""

from __future__ import annotations

import torch

from instructkit.data.pipeline import PreparedData, encode_splits, mask_summary, prepare_data, supervision_words
from instructkit.data.rendering import marked_text
from instructkit.data.prompts import PromptStyle, resolve_prompt_style
from instructkit.devices import resolve_device
from instructkit.errors import UserError
from instructkit.fileio import atomic_write_json
from instructkit.models.registry import load_model
from instructkit.runs import RunFolder
from instructkit.train import distributed
from instructkit.train.config import TrainConfig
from instructkit.train.distributed import World
from instructkit.train.fit import say, steps_per_epoch
from instructkit.train.loop import SupervisedObjective
from instructkit.train.plot import plot_losses, plot_quality
from instructkit.train.quantized_base import frozen_linears
from instructkit.train.runner import (check_existing, check_memory, fit_and_write, make_session, make_trainable, save_trained,
                                     start_or_resume)


def load_run_config(run: RunFolder) -> TrainConfig:
    return TrainConfig.from_dict(run.config()).validate()


def check_same_run(run: RunFolder, requested: TrainConfig) -> None:
    """Refuse to continue a run folder with anything but the request it was started with."""
    check_existing(run, requested, True, lambda: load_run_config(run))


def finetune(config: TrainConfig, *, resume: bool = False, score_validation=None) -> RunFolder:
    """Run (or continue, with `resume`) the fine-tuning that `config` describes, in this process or,
    under torchrun, as one rank of several (train/distributed.py).

    `score_validation(model, tokenizer, style) -> {name: value}`, when given, runs at every
    evaluation (e.g. metrics of generated validation responses) and its values join the
    evaluation rows of metrics.jsonl and the quality plot."""
    config.validate()
    device = resolve_device(config.device, config.precision)
    world = distributed.init(device)
    try:
        return _finetune(config, resume, score_validation, device, world)
    finally:
        distributed.finish(world)


def _finetune(config: TrainConfig, resume: bool, score_validation, device: torch.device, world: World) -> RunFolder:
    run = RunFolder(config.out)
    tell = say if world.is_main else (lambda message: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = prepare_data(config.data, skip_invalid=config.skip_invalid, shuffle_seed=config.shuffle_seed,
                        group_near_duplicates=config.group_near_duplicates, fmt=config.format, columns=config.columns)
    config.data_sha256 = data.fingerprint
    check_existing(run, config, resume, lambda: load_run_config(run))
    if run.has_config():
        config.prompt_style = config.prompt_style or load_run_config(run).prompt_style
        if run.is_finished:
            tell(f"{run}: training already finished; nothing to resume")
            return run

    # An int8 / int4 base is quantized layer by layer as the checkpoint is read, from its own 16-bit
    # weights: a 1.5B model's body never exists whole in bf16 (3.1 GB) or fp32 (6.2 GB).
    loaded = load_model(config.model, seed=config.seed,
                        frozen=frozen_linears(config.base_quantize))
    torch.manual_seed(config.seed + world.rank)  # dropout and anything else drawn from the global generator
    model, tokenizer = loaded.model, loaded.tokenizer
    style = resolve_prompt_style(config.prompt_style or loaded.default_prompt_style, loaded)
    config.prompt_style = style.name
    train, val, truncated, coverage = _encode(data, style, loaded, config, world)
    wrapped = make_trainable(model, config)
    if wrapped:
        tell(f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g} (scale alpha/rank) on {wrapped} linear layers")
    model.to(device)
    check_memory(model, config, max(len(example.input_ids) for example in train), world, device, tell)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    where = f"{device.type}" + (f", {world.size} processes ({config.strategy})" if world.distributed else "")
    tell(f"Model {loaded.name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; prompt style {style.name}; "
         f"on {where}")
    session = make_session(model, config, world, device)
    state = start_or_resume(session, run, config, style, tell)
    state["truncated"] = truncated
    objective = SupervisedObjective(train, val, tokenizer, style, config, session, sample_record=data.splits.val[0],
                                    score_validation=score_validation)
    fit_and_write(session, objective, config, run, state, lambda trained: _write_outputs(trained, loaded, config, state, run, coverage))
    return run


def _encode(data: PreparedData, style: PromptStyle, loaded, config: TrainConfig, world: World = distributed.SINGLE):
    """Encoded train and validation examples, cut to the model's context (the chapter's
    allowed_max_length): returns (train, val, how many training examples were cut, the mask
    coverage that data.json keeps: per split, and the first training example marked)."""
    context = loaded.model.config.context_length
    max_length = min(config.max_length or context, context)
    encoded = encode_splits(data, style, loaded.tokenizer, mask_instructions=config.mask_instructions,
                            max_length=max_length, train_on=config.train_on, skip_invalid=config.skip_invalid)
    (train, train_report), (val, val_report) = encoded["train"], encoded["val"]
    if steps_per_epoch(len(train), config, world) == 0:
        raise UserError(f"{config.data}: {len(train)} training examples make no full step of {config.batch_size} x "
                        f"{config.grad_accum} x {world.size} process(es)")
    if not val:
        raise UserError(f"{config.data}: the validation split is empty; use a larger dataset")
    cut = train_report.truncated + val_report.truncated
    if cut and world.is_main:
        why = "--max-length" if config.max_length and config.max_length < context else "the model's context"
        say(f"Truncated {cut} examples to {max_length} positions ({why}); they lose their end token")
    coverage = {"format": data.loaded.format, "prompt_style": style.name, "supervised": supervision_words(data, style, config.train_on, config.mask_instructions),
                "train": mask_summary(train, train_report), "val": mask_summary(val, val_report),
                "example": marked_text(train[0], loaded.tokenizer)}
    if world.is_main:
        rows = coverage["train"]
        say(f"Supervised tokens per training record: min {rows['supervised_min']}, median {rows['supervised_median']}, "
            f"max {rows['supervised_max']}; the loss covers {coverage['supervised']}")
    return train, val, train_report.truncated, coverage


def _write_outputs(model, loaded, config: TrainConfig, state: dict, run: RunFolder, coverage: dict) -> None:
    save_trained(model, config, run, loaded.tokenizer_ref)
    atomic_write_json(run.data_file, coverage)
    run.write_samples(state["samples"])  # (metrics.jsonl is complete: the loop's last row is an evaluation)
    evals = [row for row in state["rows"] if row["kind"] == "eval"]
    plot_losses(evals, run.loss_plot)
    if any("val_rouge_l" in row for row in evals):
        plot_quality(evals, run.quality_plot)
    run.remove_checkpoints()  # the run is complete: the resume state (gigabytes) is no longer needed
    first, last = evals[0], evals[-1]
    skipped = state.get("skipped_steps", 0)
    if skipped:
        say(f"{skipped} steps had no supervised token (every example in them truncated before its response) "
            "and made no update")
    say(
        f"Done: {state['step']} steps in {state['elapsed_s']:.0f} s of training; "
        f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f}. Run folder: {run}"
    )
