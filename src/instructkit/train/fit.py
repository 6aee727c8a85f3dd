"""The one training loop: every training command runs through `fit`, with its objective (the loss
on a batch, its metrics and its evaluation) as a parameter; the schedule, gradient accumulation,
clipping, the evaluation cadence, early stopping, checkpoints, resume, ranks and logging are
written here once.

An objective (loop.SupervisedObjective for finetune, dpo.DPOObjective for dpo) says:
  - `step_orders(epoch)`: one epoch's global step batches (batch x processes x accumulation
    indices, the same on every rank and on resume: a pure function of the seed and the epoch);
  - `prepare(micro_batches)`: this rank's micro-batches of a step made into tensors, with the
    step's totals over every rank and micro-batch (the denominators of its loss);
  - `micro_loss(model, index, work)`: the tensor to back-propagate for micro-batch `index`, scaled
    so the summed gradient is the step's, and its metrics' sums;
  - `step_row(parts, work)`: the step's metrics over all ranks, and counts for the run's state;
  - `evaluate(session, state)`, `eval_message(row)`, `notes(row)`, `sample(session)`, `postfix(row)`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from instructkit.runs import RunFolder
from instructkit.train.checkpoint import save_checkpoint
from instructkit.train.distributed import SINGLE, World


def say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


@dataclass
class Session:
    """What one process trains with: the model (and the DDP/FSDP wrapper its steps go through),
    its optimizer, where it runs, and which rank of how many it is."""

    model: torch.nn.Module  # the plain model (what is saved, sampled from and evaluated)
    trained: torch.nn.Module  # what the steps call: the wrapper across processes, else the model
    optimizer: torch.optim.Optimizer
    world: World = SINGLE
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def say(self, message: str) -> None:
        if self.world.is_main:
            say(message)

    def checkpoint_parts(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "world": self.world, "device": self.device,
                "trained": self.trained}


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; fp32 everywhere else (bf16 is ~300x slower on these CPUs
    and refused there by the config)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, peak: float, warmup: int, schedule: str, total: int) -> float:
    """Learning rate as a pure function of the optimizer step (0-based): a linear warm-up over
    `warmup` steps to `peak`, then constant or a cosine decay to zero at step `total`."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak


def build_optimizer(model: torch.nn.Module, config, *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with `config.lr` and `config.weight_decay`; weight decay only on matrices (not on
    norms, biases or LoRA-free vectors)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each tensor in place: no optimizer-sized temporaries (the default
    # multi-tensor path allocates some, which for Gemma's 168M-value embedding is ~0.7 GB each).
    # (FSDP's sharded parameters take the plain per-tensor path.)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=fused, foreach=False if not fused else None)


def steps_per_epoch(num_examples: int, config, world: World = SINGLE) -> int:
    return (num_examples // (config.batch_size * world.size)) // config.grad_accum


def total_steps(num_examples: int, config, world: World = SINGLE) -> int:
    steps = steps_per_epoch(num_examples, config, world) * config.epochs
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def rank_micro_batches(steps: list[list[int]], batch_size: int, grad_accum: int, world: World = SINGLE) -> list[list[int]]:
    """Global step batches (batch x processes x accumulation each) cut into this rank's
    micro-batches, `grad_accum` of them per step: micro-batch k of a step holds batch x processes
    examples and rank r takes its r-th slice, so N processes train on what one would."""
    micro = batch_size * world.size
    rank_slice = slice(world.rank * batch_size, (world.rank + 1) * batch_size)
    return [step[start : start + micro][rank_slice] for step in steps for start in range(0, micro * grad_accum, micro)]


def optimizer_step(session: Session, objective, micro_batches: list[list[int]], *, lr: float,
                   clip: float | None) -> tuple[dict, dict]:
    """One optimizer step over this rank's micro-batches of a step: (the step's metrics, counts).
    Gradients are all-reduced once, on the last micro-batch, and clipped after that."""
    model, optimizer, world = session.trained, session.optimizer, session.world
    work = objective.prepare(micro_batches)
    if work.skip:  # nothing to learn from (e.g. no supervised token): no update
        return objective.step_row([], work)
    optimizer.zero_grad(set_to_none=True)
    parts = []
    for index in range(len(micro_batches)):
        last = index == len(micro_batches) - 1
        quiet = model.no_sync() if world.distributed and not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with quiet:
            loss, sums = objective.micro_loss(model, index, work)
            loss.backward()
        parts.append(sums)
    row, counts = objective.step_row(parts, work)  # may refuse (a loss that is not finite) before the update
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return row, counts


def start_state() -> dict:
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens_seen": 0, "supervised_seen": 0, "skipped_steps": 0,
            "truncated": 0, "rows": [], "best_val": None, "stale_evals": 0, "elapsed_s": 0.0, "samples": [],
            "world_size": 1}


@dataclass
class _Fit:
    session: Session
    objective: object
    config: object
    run: RunFolder
    state: dict
    loggers: object
    per_epoch: int
    steps: int

    def evaluate(self) -> None:
        state, objective = self.state, self.objective
        row = {"kind": "eval", "step": state["step"], "epoch": state["step"] / self.per_epoch,
               **objective.evaluate(self.session, state)}
        state["rows"].append(row)
        epoch = min(state["epoch"] + 1, self.config.epochs)  # the final evaluation follows the last epoch
        self.session.say(f"Ep {epoch} (Step {state['step']:06d}): Train loss {row['train_loss']:.3f}, "
                         f"Val loss {row['val_loss']:.3f}{objective.eval_message(row)}")
        for note in objective.notes(row):
            self.session.say(note)
        if state["best_val"] is None or row["val_loss"] < state["best_val"]:
            state["best_val"], state["stale_evals"] = row["val_loss"], 0
        else:
            state["stale_evals"] += 1
        self.loggers.log(row)
        self.loggers.flush()

    def step(self, group: list[list[int]]) -> None:
        state, config = self.state, self.config
        lr = lr_at(state["step"], config.lr, config.warmup, config.schedule, self.steps)
        started = time.perf_counter()
        metrics, counts = optimizer_step(self.session, self.objective, group, lr=lr, clip=config.clip)
        seconds = time.perf_counter() - started
        state["elapsed_s"] += seconds
        state["step"] += 1
        state["batch_in_epoch"] += config.grad_accum
        for name, value in counts.items():
            state[name] = state.get(name, 0) + value
        row = {"kind": "step", "step": state["step"], **metrics, "lr": lr, "seconds": seconds}
        state["rows"].append(row)
        self.loggers.log(row)
        return row

    def end_epoch(self) -> None:
        state = self.state
        text = self.objective.sample(self.session) if self.session.world.is_main else None
        if text is not None:
            state["samples"].append({"epoch": state["epoch"] + 1, "step": state["step"], "text": text})
            say(f"Sample after epoch {state['epoch'] + 1}: {text!r}")
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        save_checkpoint(self.run, state, **self.session.checkpoint_parts())


def fit(session: Session, objective, config, run: RunFolder, state: dict, loggers) -> None:
    """Train `session` on `objective` from `state` (a fresh start_state() or a checkpoint's) to
    the end of `config`'s steps or an early stop; every row goes to `loggers` (rank 0's)."""
    from tqdm import tqdm

    world = session.world
    per_epoch = steps_per_epoch(objective.train_size, config, world)
    loop = _Fit(session, objective, config, run, state, loggers, per_epoch, total_steps(objective.train_size, config, world))
    session.trained.train()
    if state["step"] == 0 and not any(row["kind"] == "eval" for row in state["rows"]):
        loop.evaluate()  # the losses before any training
    bar = tqdm(total=loop.steps, initial=state["step"], desc=objective.name, unit="step", dynamic_ncols=True,
               disable=not world.is_main)
    stopped_early = False
    while state["step"] < loop.steps and state["epoch"] < config.epochs and not stopped_early:
        orders = objective.step_orders(state["epoch"])[:per_epoch]
        batches = rank_micro_batches(orders, config.batch_size, config.grad_accum, world)
        while state["batch_in_epoch"] < len(batches) and state["step"] < loop.steps:
            row = loop.step(batches[state["batch_in_epoch"] : state["batch_in_epoch"] + config.grad_accum])
            bar.set_postfix(**objective.postfix(row))
            bar.update(1)
            if state["step"] % config.eval_every == 0:
                loop.evaluate()
                if config.early_stop is not None and state["stale_evals"] >= config.early_stop:
                    session.say(f"Early stop: validation loss has not improved for {config.early_stop} evaluations")
                    stopped_early = True
                    break
            if state["step"] % config.save_every == 0 and state["batch_in_epoch"] < len(batches):
                save_checkpoint(run, state, **session.checkpoint_parts())  # (an epoch's end saves below)
        if state["batch_in_epoch"] >= len(batches):  # the epoch is complete
            loop.end_epoch()
    bar.close()
    if not state["rows"] or state["rows"][-1]["kind"] != "eval":
        loop.evaluate()
