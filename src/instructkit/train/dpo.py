"""`instructkit dpo`: Direct Preference Optimization after instruction tuning (the chapter's bonus
material), in the same run folder and with the same resume as finetune.

    h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))
    sigmoid: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)        (e: label smoothing)
    ipo:     (h - 1 / (2 beta))^2
    robust:  (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)
    + sft_weight * (the mean negative log-likelihood of the chosen response's tokens)

log pi and log ref are the response's token log-probs (prompt masked by token spans), averaged
over its tokens (the book's default) or summed (TRL's). Rewards are beta (log pi - log ref).

What makes the usual silent bugs impossible here: the reference is a frozen copy in eval mode
under no_grad (or its log-probs computed once, in eval mode, with --precompute-ref), so it can
never track the policy; dropout is switched off in both; the response boundary comes from token
spans; a response truncated to nothing drops its pair (counted) instead of making NaN.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from instructkit.data.batching import collate
from instructkit.data.preferences import EncodedPair, encode_pairs, load_preferences
from instructkit.data.prompts import get_prompt_style
from instructkit.data.tokenize import IGNORE_INDEX
from instructkit.errors import UserError
from instructkit.models.registry import load_model, save_model_folder
from instructkit.runs import RunFolder
from instructkit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from instructkit.train.config import config_differences
from instructkit.train.loss import sequence_logprob_sums

LOSSES = ("sigmoid", "ipo", "robust")
REDUCTIONS = ("mean", "sum")


@dataclass
class DPOConfig:
    method: str = "dpo"  # tells a DPO run folder from a finetune one
    start: str = ""  # the starting model: a finished fine-tuning run folder or a model spec
    data: str = ""
    out: str = "runs/dpo"
    # The book's defaults.
    beta: float = 0.1
    lr: float = 5e-6
    weight_decay: float = 0.01
    epochs: int = 1
    batch_size: int = 8
    seed: int = 123
    logp_reduction: str = "mean"
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    append_eos: bool = True
    precompute_ref: bool = False
    max_steps: int | None = None
    max_length: int | None = None
    warmup: int = 0
    clip: float | None = None
    eval_every: int = 5
    eval_batches: int = 5
    save_every: int = 50
    prompt_style: str | None = None
    skip_invalid: bool = False
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    freeze_embedding: bool = False
    threads: int | None = None

    def validate(self) -> "DPOConfig":
        for name in ("epochs", "batch_size", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "max_length", "threads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.beta <= 0 or self.lr <= 0:
            raise UserError(f"--beta and --lr must be positive, got {self.beta} and {self.lr}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0 or self.weight_decay < 0 or self.lora_rank < 0 or self.warmup < 0:
            raise UserError("--sft-weight, --weight-decay, --lora-rank and --warmup cannot be negative")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.logp_reduction not in REDUCTIONS:
            raise UserError(f"--logp-reduction must be mean or sum, got {self.logp_reduction!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DPOConfig":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown or values.get("method") != "dpo":
            raise UserError("not a DPO run folder (its config is not a DPO config); use `instructkit finetune --resume`")
        return cls(**values)


# The loss ----------------------------------------------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses and rewards from per-pair log-probs (B,). Returns (losses, chosen rewards,
    rejected rewards), the rewards beta * (log pi - log ref), detached."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing) + F.logsigmoid(-beta * h) * label_smoothing) \
            / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen responses in rows 0..B-1, rejected in B..2B-1: inputs and targets (2B, T)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id=pad_id)


def sequence_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each row's supervised tokens, summed or averaged: (rows,), and token counts (rows,)."""
    hidden = model(inputs, return_hidden=True)
    supervised = targets != IGNORE_INDEX
    rows = supervised.nonzero()[:, 0]
    counts = supervised.sum(dim=1)
    sums = sequence_logprob_sums(hidden[supervised], model.lm_head.weight, targets[supervised], rows, inputs.shape[0])
    return (sums / counts if reduction == "mean" else sums), counts


def _pair_logprobs(model, pairs, pad_id, reduction):
    inputs, targets = pair_batch(pairs, pad_id)
    logps, counts = sequence_logprobs(model, inputs, targets, reduction)
    b = len(pairs)
    return logps[:b], logps[b:], logps, counts


@torch.no_grad()
def reference_logprobs(reference, pairs: list[EncodedPair], pad_id: int, reduction: str, batch_size: int) -> torch.Tensor:
    """(P, 2): chosen and rejected log-probs of every pair under the reference, in eval mode."""
    reference.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        chosen, rejected, _, _ = _pair_logprobs(reference, pairs[start : start + batch_size], pad_id, reduction)
        out.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(out)


def _disable_dropout(model, say) -> None:
    had = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if had:
        say(f"Dropout switched off in {len(had)} modules (p was {max(had):g}): DPO compares log-probs of two models")


# The run ----------------------------------------------------------------------------------
def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


def start_model(config: DPOConfig):
    """The starting model and its prompt style (a run folder keeps its own)."""
    start = RunFolder(config.start)
    if start.path.is_dir() and start.has_config():
        start.require_finished()
        loaded = load_model(str(start.path))
        style = get_prompt_style(config.prompt_style) if config.prompt_style else start.prompt_style()
    else:
        loaded = load_model(config.start, seed=config.seed)
        style = get_prompt_style(config.prompt_style or loaded.default_prompt_style)
    return loaded, style


def dpo(config: DPOConfig, *, resume: bool = False) -> RunFolder:
    from instructkit.train.config import TrainConfig
    from instructkit.train.lora import apply_lora
    from instructkit.train.loop import build_optimizer, lr_at

    config.validate()
    run = RunFolder(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    checkpoint = None
    if run.has_config():
        if not resume:
            raise UserError(f"{run}: already holds a run; pass --resume {run} to continue it, or choose another --out")
        differences = config_differences(DPOConfig.from_dict(run.config()), config)
        if differences:
            raise UserError(f"{run}: holds a run with other settings ({'; '.join(differences)}); choose another --out")
        if run.is_finished:
            _say(f"{run}: DPO already finished; nothing to resume")
            return run
        checkpoint = find_checkpoint(run)
    prefs = load_preferences(config.data, skip_invalid=config.skip_invalid)
    loaded, style = start_model(config)
    config.prompt_style = style.name
    torch.manual_seed(config.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    train, train_report = encode_pairs(prefs.splits.train, style, tokenizer, append_eos=config.append_eos,
                                       max_length=config.max_length)
    val, _ = encode_pairs(prefs.splits.val, style, tokenizer, append_eos=config.append_eos, max_length=config.max_length)
    _say(f"Preference pairs: train {len(train)}, validation {len(val)}; dropped: {prefs.identical} with identical "
         f"responses, {train_report.not_prefix} whose prompt is no token prefix, {train_report.truncated_away} "
         f"truncated to an empty response" + (f", {prefs.skipped_invalid} invalid" if prefs.skipped_invalid else ""))
    if len(train) < config.batch_size or not val:
        raise UserError(f"{config.data}: {len(train)} training and {len(val)} validation pairs are too few for batch {config.batch_size}")

    _disable_dropout(model, _say)
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    if config.lora_rank:
        apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, seed=config.seed)
    if config.freeze_embedding:
        model.lm_head.weight.requires_grad_(False)
    pad = tokenizer.pad_id
    ref_train = ref_val = None
    if config.precompute_ref:
        ref_train = reference_logprobs(reference, train, pad, config.logp_reduction, config.batch_size)
        ref_val = reference_logprobs(reference, val, pad, config.logp_reduction, config.batch_size)
        del reference
        reference = None
    optimizer = build_optimizer(model, TrainConfig(lr=config.lr, weight_decay=config.weight_decay))
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "rows": [], "elapsed_s": 0.0}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer)
        _say(f"Resuming {run} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']})")
    else:
        run.remove_checkpoints()
        run.write_start(config.to_dict(), style)

    per_epoch = len(train) // config.batch_size
    steps = per_epoch * config.epochs if config.max_steps is None else min(per_epoch * config.epochs, config.max_steps)
    schedule = TrainConfig(lr=config.lr, warmup=config.warmup)

    def batch_metrics(indices, pairs, refs):
        chosen, rejected, logps, counts = _pair_logprobs(model, [pairs[i] for i in indices], pad, config.logp_reduction)
        if refs is not None:
            ref_c, ref_r = refs[indices, 0], refs[indices, 1]
        else:
            with torch.no_grad():
                ref_c, ref_r, _, _ = _pair_logprobs(reference, [pairs[i] for i in indices], pad, config.logp_reduction)
        losses, reward_c, reward_r = dpo_loss(chosen, rejected, ref_c, ref_r, beta=config.beta, loss=config.loss,
                                              label_smoothing=config.label_smoothing)
        loss = losses.mean()
        if config.sft_weight:
            chosen_sum = chosen * counts[: len(indices)] if config.logp_reduction == "mean" else chosen
            loss = loss + config.sft_weight * (-chosen_sum.sum() / counts[: len(indices)].sum())
        margins = reward_c - reward_r
        row = {"loss": float(loss), "reward_chosen": float(reward_c.mean()), "reward_rejected": float(reward_r.mean()),
               "reward_margin": float(margins.mean()), "reward_accuracy": float((margins > 0).float().mean()),
               "logp_chosen": float(chosen.mean()), "logp_rejected": float(rejected.mean()),
               "ref_logp_chosen": float(ref_c.mean()), "ref_logp_rejected": float(ref_r.mean())}
        row["reward_margin_unscaled"] = row["reward_margin"] / config.beta
        return loss, row

    def evaluate() -> None:
        model.eval()
        rows = []
        with torch.no_grad():
            for name, pairs, refs in (("train", train, ref_train), ("val", val, ref_val)):
                order = list(range(len(pairs)))[: config.eval_batches * config.batch_size]
                parts = [batch_metrics(order[s : s + config.batch_size], pairs, refs)[1]
                         for s in range(0, len(order), config.batch_size)]
                rows.append({f"{name}_{k}": sum(p[k] for p in parts) / len(parts) for k in parts[0]})
        model.train()
        row = {"kind": "eval", "step": state["step"], "epoch": state["step"] / max(per_epoch, 1), **rows[0], **rows[1]}
        state["rows"].append(row)
        _say(f"Ep {min(state['epoch'] + 1, config.epochs)} (Step {state['step']:06d}): Train loss {row['train_loss']:.3f}, "
             f"Val loss {row['val_loss']:.3f}, Train reward margins {row['train_reward_margin']:.3f}, "
             f"Val reward margins {row['val_reward_margin']:.3f}")
        run.write_metrics(state["rows"])

    from tqdm import tqdm

    model.train()
    if state["step"] == 0 and not state["rows"]:
        evaluate()
    bar = tqdm(total=steps, initial=state["step"], desc="dpo", unit="step", dynamic_ncols=True)
    while state["step"] < steps:
        order = list(range(len(train)))
        random.Random(config.seed + state["epoch"]).shuffle(order)
        batches = [order[s : s + config.batch_size] for s in range(0, per_epoch * config.batch_size, config.batch_size)]
        while state["batch_in_epoch"] < len(batches) and state["step"] < steps:
            started = time.perf_counter()
            lr = lr_at(state["step"], schedule, steps)
            optimizer.zero_grad(set_to_none=True)
            loss, row = batch_metrics(batches[state["batch_in_epoch"]], train, ref_train)
            if not math.isfinite(float(loss)):
                raise UserError(f"DPO loss became {float(loss)} at step {state['step'] + 1}; lower --lr or --beta")
            loss.backward()
            if config.clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.clip)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            seconds = time.perf_counter() - started
            state["step"] += 1
            state["batch_in_epoch"] += 1
            state["elapsed_s"] += seconds
            state["rows"].append({"kind": "step", "step": state["step"], "lr": lr, "seconds": seconds, **row})
            bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['reward_margin']:.3f}")
            bar.update(1)
            if state["step"] % config.eval_every == 0:
                evaluate()
            if state["step"] % config.save_every == 0:
                save_checkpoint(run, state, model=model, optimizer=optimizer)
        if state["batch_in_epoch"] >= len(batches):
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            save_checkpoint(run, state, model=model, optimizer=optimizer)
    bar.close()
    if state["rows"][-1]["kind"] != "eval":
        evaluate()
    _finish(model, loaded, config, state, run)
    return run


def _finish(model, loaded, config: DPOConfig, state: dict, run: RunFolder) -> None:
    from safetensors.torch import save_file

    from instructkit.train.lora import lora_state_dict, merge_lora
    from instructkit.train.plot import plot_dpo

    if config.lora_rank:
        tmp = run / ".adapter.safetensors.tmp"
        save_file(lora_state_dict(model), str(tmp))
        tmp.replace(run.adapter_file)
        merge_lora(model)
    model.tie_weights()
    save_model_folder(run.path, model, loaded.tokenizer_ref)
    run.write_metrics(state["rows"])
    evals = [row for row in state["rows"] if row["kind"] == "eval"]
    plot_dpo(evals, run.loss_plot, run.path / "reward-margins-plot")
    run.remove_checkpoints()
    first, last = evals[0], evals[-1]
    _say(f"Done: {state['step']} DPO steps in {state['elapsed_s']:.0f} s; validation reward accuracy "
         f"{first['val_reward_accuracy']:.1%} -> {last['val_reward_accuracy']:.1%}, margin "
         f"{first['val_reward_margin']:.3f} -> {last['val_reward_margin']:.3f}. Run folder: {run}")
