"""`instructkit finetune`: set up, run the loop with evaluation and checkpoints, write the run folder
(runs.py names its files).

A run folder belongs to one request: resuming (or rerunning the main job) compares the saved
config with the requested one, the data's sha256 included, and refuses any difference with one
line naming the settings. Every random draw comes from the run's seed (LoRA's A matrices, the
data order, dropout through the saved RNG state), so two runs with the same arguments give the
same weights, and a killed run resumes to them.
"""

from __future__ import annotations

import time

import torch

from instructkit.data.pipeline import PreparedData, encode_splits, prepare_data
from instructkit.data.prompts import PromptStyle, get_prompt_style
from instructkit.errors import UserError
from instructkit.models.registry import load_model, save_model_folder
from instructkit.runs import RunFolder
from instructkit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from instructkit.train.config import TrainConfig
from instructkit.train.lora import apply_lora, lora_state_dict, merge_lora
from instructkit.train.loop import (
    build_optimizer,
    epoch_batches,
    eval_batches,
    evaluate_loss,
    lr_at,
    sample_text,
    steps_per_epoch,
    total_steps,
    train_step,
)
from instructkit.train.plot import plot_losses, plot_quality


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


def load_run_config(run: RunFolder) -> TrainConfig:
    return TrainConfig.from_dict(run.config()).validate()


def check_same_run(run: RunFolder, requested: TrainConfig) -> None:
    """Refuse to continue a run folder with anything but the request it was started with."""
    differences = load_run_config(run).differences(requested)
    if differences:
        raise UserError(f"{run}: holds a run with other settings ({'; '.join(differences)}); "
                        f"choose another --out, or remove {run} to start over")


def _start_state() -> dict:
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens_seen": 0, "supervised_seen": 0, "skipped_steps": 0,
            "truncated": 0, "rows": [], "best_val": None, "stale_evals": 0, "elapsed_s": 0.0, "samples": []}


def finetune(config: TrainConfig, *, resume: bool = False, score_validation=None) -> RunFolder:
    """Run (or continue, with `resume`) the fine-tuning that `config` describes.

    `score_validation(model, tokenizer, style) -> {name: value}`, when given, runs at every
    evaluation (e.g. metrics of generated validation responses) and its values join the
    evaluation rows of metrics.jsonl and the quality plot."""
    config.validate()
    run = RunFolder(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    data = prepare_data(config.data, skip_invalid=config.skip_invalid, shuffle_seed=config.shuffle_seed,
                        group_near_duplicates=config.group_near_duplicates)
    config.data_sha256 = data.fingerprint
    checkpoint = None
    if run.has_config():
        if not resume:
            raise UserError(f"{run}: already holds a run; pass --resume {run} to continue it, or choose another --out")
        check_same_run(run, config)
        config.prompt_style = config.prompt_style or load_run_config(run).prompt_style
        if run.is_finished:
            _say(f"{run}: training already finished; nothing to resume")
            return run
        checkpoint = find_checkpoint(run)
        if checkpoint is None:
            _say(f"{run}: no checkpoint yet (the run stopped before its first save); starting it afresh")

    loaded = load_model(config.model, seed=config.seed)
    torch.manual_seed(config.seed)  # dropout and anything else drawn from the global generator
    model, tokenizer = loaded.model, loaded.tokenizer
    style = get_prompt_style(config.prompt_style or loaded.default_prompt_style)
    config.prompt_style = style.name
    train, val, truncated = _encode(data, style, loaded, config)

    if config.lora_rank:
        wrapped = apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, seed=config.seed)
        _say(f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g} (scale alpha/rank) on {wrapped} linear layers")
    if config.freeze_embedding:
        model.tie_weights()  # the head's weight is the embedding: freezing it freezes both
        model.lm_head.weight.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    _say(f"Model {loaded.name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; prompt style {style.name}")
    optimizer = build_optimizer(model, config)

    state = _start_state()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        _say(f"Resuming {run} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']})")
    else:
        run.remove_checkpoints()
        run.write_start(config.to_dict(), style)
        state["truncated"] = truncated

    _fit(model, tokenizer, style, config, train, val, data.splits.val[0], optimizer, state, run, score_validation)
    _write_outputs(model, loaded, config, state, run)
    return run


def _encode(data: PreparedData, style: PromptStyle, loaded, config: TrainConfig):
    """Encoded train and validation examples, cut to the model's context (the chapter's
    allowed_max_length): returns (train, val, how many training examples were cut)."""
    context = loaded.model.config.context_length
    max_length = min(config.max_length or context, context)
    encoded = encode_splits(data, style, loaded.tokenizer, mask_instructions=config.mask_instructions,
                            max_length=max_length)
    (train, train_report), (val, val_report) = encoded["train"], encoded["val"]
    if steps_per_epoch(len(train), config) == 0:
        raise UserError(f"{config.data}: {len(train)} training examples make no full batch of {config.batch_size} x {config.grad_accum}")
    if not val:
        raise UserError(f"{config.data}: the validation split is empty; use a larger dataset")
    cut = train_report.truncated + val_report.truncated
    if cut:
        why = "--max-length" if config.max_length and config.max_length < context else "the model's context"
        _say(f"Truncated {cut} examples to {max_length} positions ({why}); they lose their end token")
    return train, val, train_report.truncated


def _fit(model, tokenizer, style: PromptStyle, config, train, val, sample_record, optimizer, state, run: RunFolder,
         score_validation=None) -> None:
    from tqdm import tqdm

    pad = tokenizer.pad_id
    per_epoch = steps_per_epoch(len(train), config)
    steps = total_steps(len(train), config)
    train_eval = eval_batches(train, config.batch_size, config.eval_batches)
    val_eval = eval_batches(val, config.batch_size, config.eval_batches)
    model.train()

    def evaluate() -> None:
        train_loss = evaluate_loss(model, train, train_eval, pad)
        val_loss = evaluate_loss(model, val, val_eval, pad)
        row = {"kind": "eval", "step": state["step"], "epoch": state["step"] / per_epoch,
               "tokens_seen": state["tokens_seen"], "train_loss": train_loss, "val_loss": val_loss,
               "elapsed_s": state["elapsed_s"]}
        if score_validation is not None:
            model.eval()
            row.update(score_validation(model, tokenizer, style))
            model.train()
        state["rows"].append(row)
        epoch = min(state["epoch"] + 1, config.epochs)  # the final evaluation follows the last epoch
        scores = "".join(f", {name.removeprefix('val_')} {value:.3f}" for name, value in row.items()
                         if name.startswith("val_") and name != "val_loss")
        _say(f"Ep {epoch} (Step {state['step']:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}{scores}")
        if state["best_val"] is None or val_loss < state["best_val"]:
            state["best_val"], state["stale_evals"] = val_loss, 0
        else:
            state["stale_evals"] += 1
        run.write_metrics(state["rows"])

    if state["step"] == 0 and not any(r["kind"] == "eval" for r in state["rows"]):
        evaluate()  # the losses before any training
    bar = tqdm(total=steps, initial=state["step"], desc="fine-tune", unit="step", dynamic_ncols=True)
    stopped_early = False
    while state["step"] < steps and state["epoch"] < config.epochs and not stopped_early:
        batches = epoch_batches(train, config, state["epoch"])[: per_epoch * config.grad_accum]
        while state["batch_in_epoch"] < len(batches) and state["step"] < steps:
            group = batches[state["batch_in_epoch"] : state["batch_in_epoch"] + config.grad_accum]
            lr = lr_at(state["step"], config, steps)
            started = time.perf_counter()
            result = train_step(model, optimizer, train, group, pad_id=pad, lr=lr, clip=config.clip)
            seconds = time.perf_counter() - started
            state["elapsed_s"] += seconds
            state["step"] += 1
            state["batch_in_epoch"] += config.grad_accum
            state["tokens_seen"] += result.padded_tokens
            state["supervised_seen"] += result.supervised_tokens
            state["skipped_steps"] += result.skipped
            row = {"kind": "step", "step": state["step"], "loss": None if result.skipped else result.loss, "lr": lr,
                   "real_tokens": result.real_tokens, "supervised_tokens": result.supervised_tokens, "seconds": seconds}
            state["rows"].append({**row, "skipped": True} if result.skipped else row)
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{result.real_tokens / seconds:.0f}")
            bar.update(1)
            if state["step"] % config.eval_every == 0:
                evaluate()
                if config.early_stop is not None and state["stale_evals"] >= config.early_stop:
                    _say(f"Early stop: validation loss has not improved for {config.early_stop} evaluations")
                    stopped_early = True
                    break
            if state["step"] % config.save_every == 0:
                save_checkpoint(run, model, optimizer, state)
        if state["batch_in_epoch"] >= len(batches):  # the epoch is complete
            if config.sample_prompt:
                text = sample_text(model, tokenizer, style, sample_record)
                state["samples"].append({"epoch": state["epoch"] + 1, "step": state["step"], "text": text})
                _say(f"Sample after epoch {state['epoch'] + 1}: {text!r}")
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            save_checkpoint(run, model, optimizer, state)
    bar.close()
    if not state["rows"] or state["rows"][-1]["kind"] != "eval":
        evaluate()


def _write_outputs(model, loaded, config: TrainConfig, state: dict, run: RunFolder) -> None:
    from safetensors.torch import save_file

    if config.lora_rank:
        tmp = run / ".adapter.safetensors.tmp"
        save_file(lora_state_dict(model), str(tmp))
        tmp.replace(run.adapter_file)
        merge_lora(model)
    model.tie_weights()
    save_model_folder(run.path, model, loaded.tokenizer_ref)
    run.write_samples(state["samples"])
    run.write_metrics(state["rows"])
    evals = [row for row in state["rows"] if row["kind"] == "eval"]
    plot_losses(evals, run.loss_plot)
    if any("val_rouge_l" in row for row in evals):
        plot_quality(evals, run.quality_plot)
    run.remove_checkpoints()  # the run is complete: the resume state (gigabytes) is no longer needed
    first, last = evals[0], evals[-1]
    skipped = state.get("skipped_steps", 0)
    if skipped:
        _say(f"{skipped} steps had no supervised token (every example in them truncated before its response) "
             "and made no update")
    _say(
        f"Done: {state['step']} steps in {state['elapsed_s']:.0f} s of training; "
        f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f}. Run folder: {run}"
    )
