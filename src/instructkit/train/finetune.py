"""`instructkit finetune`: set up, run the loop with evaluation and checkpoints, write the run folder.

The run folder describes itself:
    config.json           the resolved TrainConfig
    prompt_style.json     the prompt style used (training, generation, judge and export read it)
    model.json, model.safetensors, tokenizer_ref.json [, tokenizer.json]   the fine-tuned model
    adapter.safetensors   the LoRA tensors alone (LoRA runs)
    metrics.jsonl         one row per optimizer step and per evaluation
    loss-plot.png / .pdf  the chapter's plot
    samples.jsonl         a greedy sample for a fixed validation prompt after each epoch
    checkpoint/           resume state while the run is unfinished
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from instructkit.data.pipeline import encode_splits, prepare_data
from instructkit.data.prompts import PromptStyle, get_prompt_style
from instructkit.errors import UserError
from instructkit.fileio import atomic_write_json, atomic_write_jsonl
from instructkit.models.registry import load_model, save_model_folder
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
from instructkit.train.plot import plot_losses


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if not path.exists():
        raise UserError(f"{run_dir}: no config.json, so not a fine-tuning run folder to resume")
    return TrainConfig.from_dict(json.loads(path.read_text())).validate()


def finetune(config: TrainConfig, *, resume: bool = False) -> Path:
    config.validate()
    run_dir = Path(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    if not resume and (run_dir / "config.json").exists():
        raise UserError(f"{run_dir}: already holds a run; pass --resume {run_dir} to continue it, or choose another --out")
    if resume and (run_dir / "model.safetensors").exists() and find_checkpoint(run_dir) is None:
        _say(f"{run_dir}: this run already finished; nothing to resume")
        return run_dir

    loaded = load_model(config.model, seed=config.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    style = get_prompt_style(config.prompt_style or loaded.default_prompt_style)
    config.prompt_style = style.name
    data = prepare_data(config.data, skip_invalid=config.skip_invalid, shuffle_seed=config.shuffle_seed)
    encoded = encode_splits(data, style, tokenizer, mask_instructions=config.mask_instructions, max_length=config.max_length)
    train, val = encoded["train"][0], encoded["val"][0]
    if steps_per_epoch(len(train), config) == 0:
        raise UserError(f"{config.data}: {len(train)} training examples make no full batch of {config.batch_size} x {config.grad_accum}")
    if not val:
        raise UserError(f"{config.data}: the validation split is empty; use a larger dataset")

    if config.lora_rank:
        wrapped = apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha)
        _say(f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g} on {wrapped} linear layers")
    if config.freeze_embedding:
        model.tie_weights()  # the head's weight is the embedding: freezing it freezes both
        model.lm_head.weight.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    _say(f"Model {loaded.name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; prompt style {style.name}")
    optimizer = build_optimizer(model, config)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens_seen": 0, "supervised_seen": 0,
             "rows": [], "best_val": None, "stale_evals": 0, "elapsed_s": 0.0, "samples": []}
    if resume:
        checkpoint = find_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(f"{run_dir}: no checkpoint to resume from (the run stopped before its first save)")
        state = load_checkpoint(checkpoint, model, optimizer)
        _say(f"Resuming {run_dir} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config.to_dict())
        atomic_write_json(run_dir / "prompt_style.json", style.to_dict())

    _fit(model, tokenizer, style, config, train, val, data.splits.val[0], optimizer, state, run_dir)
    _write_outputs(model, loaded, config, state, run_dir)
    return run_dir


def _fit(model, tokenizer, style: PromptStyle, config, train, val, sample_record, optimizer, state, run_dir) -> None:
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
        state["rows"].append(row)
        epoch = min(state["epoch"] + 1, config.epochs)  # the final evaluation follows the last epoch
        _say(f"Ep {epoch} (Step {state['step']:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        if state["best_val"] is None or val_loss < state["best_val"]:
            state["best_val"], state["stale_evals"] = val_loss, 0
        else:
            state["stale_evals"] += 1
        atomic_write_jsonl(run_dir / "metrics.jsonl", state["rows"])

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
            state["rows"].append({"kind": "step", "step": state["step"], "loss": result.loss, "lr": lr,
                                  "real_tokens": result.real_tokens, "supervised_tokens": result.supervised_tokens,
                                  "seconds": seconds})
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{result.real_tokens / seconds:.0f}")
            bar.update(1)
            if state["step"] % config.eval_every == 0:
                evaluate()
                if config.early_stop is not None and state["stale_evals"] >= config.early_stop:
                    _say(f"Early stop: validation loss has not improved for {config.early_stop} evaluations")
                    stopped_early = True
                    break
            if state["step"] % config.save_every == 0:
                save_checkpoint(run_dir, model, optimizer, state)
        if state["batch_in_epoch"] >= len(batches):  # the epoch is complete
            if config.sample_prompt:
                text = sample_text(model, tokenizer, style, sample_record)
                state["samples"].append({"epoch": state["epoch"] + 1, "step": state["step"], "text": text})
                _say(f"Sample after epoch {state['epoch'] + 1}: {text!r}")
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            save_checkpoint(run_dir, model, optimizer, state)
    bar.close()
    if not state["rows"] or state["rows"][-1]["kind"] != "eval":
        evaluate()


def _write_outputs(model, loaded, config: TrainConfig, state: dict, run_dir: Path) -> None:
    from safetensors.torch import save_file

    if config.lora_rank:
        adapter = lora_state_dict(model)
        tmp = run_dir / ".adapter.safetensors.tmp"
        save_file(adapter, str(tmp))
        tmp.replace(run_dir / "adapter.safetensors")
        merge_lora(model)
    model.tie_weights()
    save_model_folder(run_dir, model, loaded.tokenizer_ref)
    atomic_write_jsonl(run_dir / "samples.jsonl", state["samples"])
    atomic_write_jsonl(run_dir / "metrics.jsonl", state["rows"])
    evals = [row for row in state["rows"] if row["kind"] == "eval"]
    plot_losses(evals, run_dir / "loss-plot")
    # The run is complete: the resume state is no longer needed (it can be gigabytes).
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    first, last = evals[0], evals[-1]
    _say(
        f"Done: {state['step']} steps in {state['elapsed_s']:.0f} s of training; "
        f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f}. Run folder: {run_dir}"
    )
