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
from dataclasses import dataclass

import torch

from instructkit.data.pipeline import PreparedData, encode_splits, prepare_data
from instructkit.data.prompts import PromptStyle, get_prompt_style
from instructkit.devices import resolve_device
from instructkit.errors import UserError
from instructkit.models.registry import load_model, save_model_folder
from instructkit.runs import RunFolder
from instructkit.train import distributed
from instructkit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from instructkit.train.distributed import World
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
            "truncated": 0, "rows": [], "best_val": None, "stale_evals": 0, "elapsed_s": 0.0, "samples": [],
            "world_size": 1}


@dataclass
class Session:
    """What one process trains with: the model (and the DDP/FSDP wrapper its steps go through),
    its optimizer, where it runs, and which rank of how many it is."""

    model: torch.nn.Module  # the plain model (what is saved, sampled from and evaluated)
    trained: torch.nn.Module  # what the steps call: the wrapper across processes, else the model
    optimizer: torch.optim.Optimizer
    world: World
    device: torch.device
    precision: str

    def say(self, message: str) -> None:
        if self.world.is_main:
            _say(message)

    def checkpoint_parts(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "world": self.world, "device": self.device,
                "trained": self.trained}


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
    say = _say if world.is_main else (lambda message: None)
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
            say(f"{run}: training already finished; nothing to resume")
            return run
        checkpoint = find_checkpoint(run)
        if checkpoint is None:
            say(f"{run}: no checkpoint yet (the run stopped before its first save); starting it afresh")

    loaded = load_model(config.model, seed=config.seed)
    torch.manual_seed(config.seed + world.rank)  # dropout and anything else drawn from the global generator
    model, tokenizer = loaded.model, loaded.tokenizer
    style = get_prompt_style(config.prompt_style or loaded.default_prompt_style)
    config.prompt_style = style.name
    train, val, truncated = _encode(data, style, loaded, config, world)

    if config.lora_rank:
        wrapped = apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, seed=config.seed)
        say(f"LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g} (scale alpha/rank) on {wrapped} linear layers")
    if config.freeze_embedding:
        model.tie_weights()  # the head's weight is the embedding: freezing it freezes both
        model.lm_head.weight.requires_grad_(False)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    where = f"{device.type}" + (f", {world.size} processes ({config.strategy})" if world.distributed else "")
    say(f"Model {loaded.name}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; prompt style {style.name}; "
        f"on {where}")
    trained = distributed.wrap(model, world, device, config.strategy)
    optimizer = build_optimizer(trained, config, fused=config.strategy != "fsdp")
    session = Session(model, trained, optimizer, world, device, config.precision)

    state = _start_state()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, world=world, device=device, trained=trained)
        distributed.check_world(state.get("world_size", 1), world)
        say(f"Resuming {run} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']})")
    else:
        if world.is_main:
            run.remove_checkpoints()
            run.write_start(config.to_dict(), style)
        state["truncated"], state["world_size"] = truncated, world.size
    distributed.barrier(world)

    _fit(session, tokenizer, style, config, train, val, data.splits.val[0], state, run, score_validation)
    full = distributed.full_state(session.trained, world)  # every rank takes part in gathering a sharded model
    if world.is_main:
        _write_outputs(model, loaded, config, state, run, full)
    distributed.barrier(world)
    return run


def _encode(data: PreparedData, style: PromptStyle, loaded, config: TrainConfig, world: World = distributed.SINGLE):
    """Encoded train and validation examples, cut to the model's context (the chapter's
    allowed_max_length): returns (train, val, how many training examples were cut)."""
    context = loaded.model.config.context_length
    max_length = min(config.max_length or context, context)
    encoded = encode_splits(data, style, loaded.tokenizer, mask_instructions=config.mask_instructions,
                            max_length=max_length)
    (train, train_report), (val, val_report) = encoded["train"], encoded["val"]
    if steps_per_epoch(len(train), config, world) == 0:
        raise UserError(f"{config.data}: {len(train)} training examples make no full step of {config.batch_size} x "
                        f"{config.grad_accum} x {world.size} process(es)")
    if not val:
        raise UserError(f"{config.data}: the validation split is empty; use a larger dataset")
    cut = train_report.truncated + val_report.truncated
    if cut and world.is_main:
        why = "--max-length" if config.max_length and config.max_length < context else "the model's context"
        _say(f"Truncated {cut} examples to {max_length} positions ({why}); they lose their end token")
    return train, val, train_report.truncated


def _fit(session: Session, tokenizer, style: PromptStyle, config, train, val, sample_record, state, run: RunFolder,
         score_validation=None) -> None:
    from tqdm import tqdm

    world, device = session.world, session.device
    pad = tokenizer.pad_id
    per_epoch = steps_per_epoch(len(train), config, world)
    steps = total_steps(len(train), config, world)
    train_eval = eval_batches(train, config.batch_size, config.eval_batches)
    val_eval = eval_batches(val, config.batch_size, config.eval_batches)
    session.trained.train()

    def evaluate() -> None:
        measure = dict(world=world, device=device, precision=session.precision)
        train_loss = evaluate_loss(session.trained, train, train_eval, pad, **measure)
        val_loss = evaluate_loss(session.trained, val, val_eval, pad, **measure)
        row = {"kind": "eval", "step": state["step"], "epoch": state["step"] / per_epoch,
               "tokens_seen": state["tokens_seen"], "train_loss": train_loss, "val_loss": val_loss,
               "elapsed_s": state["elapsed_s"]}
        if score_validation is not None and world.is_main and not world.distributed:
            session.model.eval()
            row.update(score_validation(session.model, tokenizer, style))
            session.model.train()
        state["rows"].append(row)
        epoch = min(state["epoch"] + 1, config.epochs)  # the final evaluation follows the last epoch
        scores = "".join(f", {name.removeprefix('val_')} {value:.3f}" for name, value in row.items()
                         if name.startswith("val_") and name != "val_loss")
        session.say(f"Ep {epoch} (Step {state['step']:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}{scores}")
        if state["best_val"] is None or val_loss < state["best_val"]:
            state["best_val"], state["stale_evals"] = val_loss, 0
        else:
            state["stale_evals"] += 1
        if world.is_main:
            run.write_metrics(state["rows"])

    if state["step"] == 0 and not any(r["kind"] == "eval" for r in state["rows"]):
        evaluate()  # the losses before any training
    bar = tqdm(total=steps, initial=state["step"], desc="fine-tune", unit="step", dynamic_ncols=True,
               disable=not world.is_main)
    stopped_early = False
    while state["step"] < steps and state["epoch"] < config.epochs and not stopped_early:
        batches = epoch_batches(train, config, state["epoch"], world)[: per_epoch * config.grad_accum]
        while state["batch_in_epoch"] < len(batches) and state["step"] < steps:
            group = batches[state["batch_in_epoch"] : state["batch_in_epoch"] + config.grad_accum]
            lr = lr_at(state["step"], config, steps)
            started = time.perf_counter()
            result = train_step(session.trained, session.optimizer, train, group, pad_id=pad, lr=lr, clip=config.clip,
                                world=world, device=device, precision=session.precision)
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
                    session.say(f"Early stop: validation loss has not improved for {config.early_stop} evaluations")
                    stopped_early = True
                    break
            if state["step"] % config.save_every == 0 and state["batch_in_epoch"] < len(batches):
                save_checkpoint(run, state, **session.checkpoint_parts())  # (an epoch's end saves below)
        if state["batch_in_epoch"] >= len(batches):  # the epoch is complete
            if config.sample_prompt and world.is_main and config.strategy != "fsdp":
                # Rank 0 alone, from the plain model: no collective runs while the others wait.
                text = sample_text(session.model, tokenizer, style, sample_record)
                state["samples"].append({"epoch": state["epoch"] + 1, "step": state["step"], "text": text})
                _say(f"Sample after epoch {state['epoch'] + 1}: {text!r}")
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            save_checkpoint(run, state, **session.checkpoint_parts())
    bar.close()
    if not state["rows"] or state["rows"][-1]["kind"] != "eval":
        evaluate()


def _write_outputs(model, loaded, config: TrainConfig, state: dict, run: RunFolder, full_state: dict | None) -> None:
    from safetensors.torch import save_file

    if full_state is not None:  # a sharded model: its weights, gathered from every rank, into a plain copy
        from instructkit.models.checkpoints import skip_weight_init
        from instructkit.models.registry import build_model

        with skip_weight_init():
            model = build_model(model.config)
        if config.lora_rank:
            apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, seed=config.seed)
        model.load_state_dict(full_state)
    model = model.cpu()
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
