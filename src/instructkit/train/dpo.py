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

import torch
import torch.nn.functional as F

from instructkit.data.batching import batches_in_order, collate, length_grouped_batches
from instructkit.data.preferences import EncodedPair, encode_pairs, load_preferences
from instructkit.data.prompts import get_prompt_style
from instructkit.devices import resolve_device
from instructkit.data.tokenize import IGNORE_INDEX
from instructkit.errors import UserError
from instructkit.models.registry import load_model, save_model_folder
from instructkit.runs import RunFolder
from instructkit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from instructkit.train import distributed
from instructkit.train.config import BATCHING, config_differences
from instructkit.train.distributed import SINGLE, World, all_reduce_sum, shard, unwrap
from instructkit.train.loss import sequence_logprob_sums

from instructkit.train.config import LOSSES, REDUCTIONS, DPOConfig  # noqa: F401 (DPOConfig's home was here)


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
    """Log-probs of each row's supervised tokens, summed or averaged: (rows,), and token counts (rows,).
    `model` may be a DDP wrapper: the forward goes through it, the tied head is read inside."""
    hidden = model(inputs, return_hidden=True)
    supervised = targets != IGNORE_INDEX
    rows = supervised.nonzero()[:, 0]
    counts = supervised.sum(dim=1)
    sums = sequence_logprob_sums(hidden[supervised], unwrap(model).lm_head.weight, targets[supervised], rows, inputs.shape[0])
    return (sums / counts if reduction == "mean" else sums), counts


def _pair_logprobs(model, pairs, pad_id, reduction, device=None):
    inputs, targets = pair_batch(pairs, pad_id)
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    logps, counts = sequence_logprobs(model, inputs, targets, reduction)
    b = len(pairs)
    return logps[:b], logps[b:], logps, counts


@torch.no_grad()
def reference_logprobs(reference, pairs: list[EncodedPair], pad_id: int, reduction: str, batch_size: int,
                       *, world: World = SINGLE, device: torch.device | None = None,
                       needed: list[int] | None = None) -> torch.Tensor:
    """(P, 2): chosen and rejected log-probs of the pairs under the reference, in eval mode; only
    the rows `needed` (default: all) are computed, the others are NaN so a stray read shows.
    Across processes each rank computes its share of the pairs and a sum of the (otherwise zero)
    rows gives every rank all of them."""
    reference.eval()
    device = device or next(reference.parameters()).device
    table = torch.zeros(len(pairs), 2, dtype=torch.float64 if world.distributed else torch.float32, device=device)
    needed = sorted(set(range(len(pairs)) if needed is None else needed))
    # Chunks of similar length pad little; the table is indexed by pair, so the order is free.
    mine = sorted(shard(needed, world), key=lambda i: _pair_length(pairs[i]))
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        chosen, rejected, _, _ = _pair_logprobs(reference, [pairs[i] for i in chunk], pad_id, reduction, device)
        table[chunk] = torch.stack([chosen, rejected], dim=1).to(table.dtype)
    if world.distributed:
        torch.distributed.all_reduce(table)
    unused = torch.ones(len(pairs), dtype=torch.bool, device=device)
    unused[needed] = False
    table[unused] = float("nan")
    return table.float()


def _pair_length(pair: EncodedPair) -> int:
    """The width a pair needs in a batch: its chosen and rejected rows are padded together."""
    return max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))


def epoch_batches(pairs: list[EncodedPair], global_batch: int, *, batching: str, seed: int) -> list[list[int]]:
    """One epoch's global batches of pair indices (full batches only), the same on every rank."""
    if batching == "grouped":
        return length_grouped_batches([_pair_length(p) for p in pairs], global_batch, seed=seed, drop_last=True)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return batches_in_order(order, global_batch, drop_last=True)


def drift_warning(row: dict) -> str | None:
    """A line for the log when an evaluation `row` shows the chosen responses losing likelihood on
    the validation pairs (their log-prob below the starting model's): DPO then pushes both
    responses down, and past that point a model tends to stop ending its answers (measured on the
    chapter's pairs: docs/BENCHMARKS.md, "DPO"). None while the chosen ones hold."""
    policy, reference = row["val_logp_chosen"], row["val_ref_logp_chosen"]
    if policy >= reference:
        return None
    return (f"Warning: at step {row['step']} the chosen responses' log-prob on the validation pairs ({policy:.3f}) "
            f"fell below the starting model's ({reference:.3f}); the model may stop ending its answers. "
            f"Fewer steps (--max-steps), a lower --lr or --sft-weight keep it")


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
    """Run (or continue) the DPO run `config` describes, in this process or, under torchrun, as
    one rank of several: the same exactness as finetune (train/distributed.py), each step's
    pairs are one global batch sliced per rank and its loss the mean over all of them."""
    config.validate()
    device = resolve_device(config.device, config.precision)
    world = distributed.init(device)
    try:
        return _dpo(config, resume, device, world)
    finally:
        distributed.finish(world)


def _metric_sums(row: dict, pairs: int) -> dict:
    return {name: value * pairs for name, value in row.items()}


def _dpo(config: DPOConfig, resume: bool, device: torch.device, world: World) -> RunFolder:
    from instructkit.train.config import TrainConfig
    from instructkit.train.lora import apply_lora
    from instructkit.train.loop import autocast, build_optimizer, lr_at

    run = RunFolder(config.out)
    say = _say if world.is_main else (lambda message: None)
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
            say(f"{run}: DPO already finished; nothing to resume")
            return run
        checkpoint = find_checkpoint(run)
    prefs = load_preferences(config.data, skip_invalid=config.skip_invalid)
    loaded, style = start_model(config)
    config.prompt_style = style.name
    torch.manual_seed(config.seed + world.rank)
    model, tokenizer = loaded.model, loaded.tokenizer
    train, train_report = encode_pairs(prefs.splits.train, style, tokenizer, append_eos=config.append_eos,
                                       max_length=config.max_length)
    val, _ = encode_pairs(prefs.splits.val, style, tokenizer, append_eos=config.append_eos, max_length=config.max_length)
    say(f"Preference pairs: train {len(train)}, validation {len(val)}; dropped: {prefs.identical} with identical "
        f"responses, {train_report.not_prefix} whose prompt is no token prefix, {train_report.truncated_away} "
        f"truncated to an empty response" + (f", {prefs.skipped_invalid} invalid" if prefs.skipped_invalid else ""))
    global_batch = config.batch_size * world.size
    if len(train) < global_batch or not val:
        raise UserError(f"{config.data}: {len(train)} training and {len(val)} validation pairs are too few for batch "
                        f"{config.batch_size} x {world.size} process(es)")

    _disable_dropout(model, say)
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    if config.lora_rank:
        apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, seed=config.seed)
    if config.freeze_embedding:
        model.lm_head.weight.requires_grad_(False)
    model.to(device)
    reference.to(device)
    pad = tokenizer.pad_id
    per_epoch = len(train) // global_batch
    steps = per_epoch * config.epochs if config.max_steps is None else min(per_epoch * config.epochs, config.max_steps)
    evaluated = config.eval_batches * global_batch  # evaluate() reads the first pairs of each split

    def global_batches(epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s global batches of training pairs, the same on every rank and on resume."""
        return epoch_batches(train, global_batch, batching=config.batching, seed=config.seed + epoch)

    ref_train = ref_val = None
    if config.precompute_ref:
        # Only the pairs the run will read: a --max-steps run short of an epoch needs a fraction.
        used = set(range(min(evaluated, len(train))))
        for epoch in range(math.ceil(steps / per_epoch)):
            for batch in global_batches(epoch)[: steps - epoch * per_epoch]:
                used.update(batch)
        common = dict(world=world, device=device)
        ref_train = reference_logprobs(reference, train, pad, config.logp_reduction, config.batch_size,
                                       needed=sorted(used), **common)
        ref_val = reference_logprobs(reference, val, pad, config.logp_reduction, config.batch_size,
                                     needed=list(range(min(evaluated, len(val)))), **common)
        del reference
        reference = None
    trained = distributed.wrap(model, world, device, "ddp")
    optimizer = build_optimizer(trained, TrainConfig(lr=config.lr, weight_decay=config.weight_decay))
    parts = dict(model=model, optimizer=optimizer, world=world, device=device, trained=trained)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "rows": [], "elapsed_s": 0.0, "world_size": world.size}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, **parts)
        distributed.check_world(state.get("world_size", 1), world)
        say(f"Resuming {run} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']})")
    elif world.is_main:
        run.remove_checkpoints()
        run.write_start(config.to_dict(), style)
    distributed.barrier(world)

    schedule = TrainConfig(lr=config.lr, warmup=config.warmup)

    def pair_terms(net, indices, pairs, refs):
        """This rank's pairs `indices`: per-pair DPO losses, the chosen responses' summed token
        log-probs and token count (for the SFT term), and the metrics' sums over the pairs."""
        with autocast(device, config.precision):
            chosen, rejected, logps, counts = _pair_logprobs(net, [pairs[i] for i in indices], pad, config.logp_reduction, device)
            if refs is not None:
                ref_c, ref_r = refs[indices, 0], refs[indices, 1]
            else:
                with torch.no_grad():
                    ref_c, ref_r, _, _ = _pair_logprobs(reference, [pairs[i] for i in indices], pad, config.logp_reduction, device)
        chosen, rejected, ref_c, ref_r = chosen.float(), rejected.float(), ref_c.float(), ref_r.float()
        losses, reward_c, reward_r = dpo_loss(chosen, rejected, ref_c, ref_r, beta=config.beta, loss=config.loss,
                                              label_smoothing=config.label_smoothing)
        chosen_counts = counts[: len(indices)]
        chosen_token_sum = (chosen * chosen_counts if config.logp_reduction == "mean" else chosen).sum()
        margins = reward_c - reward_r
        sums = {"dpo_loss": float(losses.detach().sum()), "reward_chosen": float(reward_c.sum()),
                "reward_rejected": float(reward_r.sum()), "reward_margin": float(margins.sum()),
                "reward_accuracy": float((margins > 0).float().sum()), "logp_chosen": float(chosen.detach().sum()),
                "logp_rejected": float(rejected.detach().sum()), "ref_logp_chosen": float(ref_c.sum()),
                "ref_logp_rejected": float(ref_r.sum()), "chosen_nll": float(-chosen_token_sum.detach()),
                "chosen_tokens": float(chosen_counts.sum()), "pairs": float(len(indices))}
        return losses.sum(), chosen_token_sum, sums

    def row_from(sums: dict) -> dict:
        """Means over all ranks' pairs: the loss is the step's (DPO mean + SFT weight x token-mean NLL)."""
        sums = {name: all_reduce_sum(value, world, device) for name, value in sums.items()}
        pairs = max(sums.pop("pairs"), 1.0)
        tokens = max(sums.pop("chosen_tokens"), 1.0)
        nll = sums.pop("chosen_nll") / tokens
        row = {name: value / pairs for name, value in sums.items()}
        row["loss"] = row.pop("dpo_loss") + config.sft_weight * nll
        row["reward_margin_unscaled"] = row["reward_margin"] / config.beta
        return row

    warned = False  # the drift warning is said once per process

    def evaluate() -> None:
        nonlocal warned
        trained.eval()
        rows = []
        with torch.no_grad():
            for name, pairs, refs in (("train", train, ref_train), ("val", val, ref_val)):
                mine = shard(list(range(len(pairs)))[:evaluated], world)
                totals: dict = {}
                for start in range(0, len(mine), config.batch_size):
                    _, _, sums = pair_terms(model, mine[start : start + config.batch_size], pairs, refs)
                    totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
                keys = ("dpo_loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen",
                        "logp_rejected", "ref_logp_chosen", "ref_logp_rejected", "chosen_nll", "chosen_tokens", "pairs")
                rows.append({f"{name}_{k}": v for k, v in row_from({k: totals.get(k, 0.0) for k in keys}).items()})
        trained.train()
        row = {"kind": "eval", "step": state["step"], "epoch": state["step"] / max(per_epoch, 1), **rows[0], **rows[1]}
        state["rows"].append(row)
        say(f"Ep {min(state['epoch'] + 1, config.epochs)} (Step {state['step']:06d}): Train loss {row['train_loss']:.3f}, "
            f"Val loss {row['val_loss']:.3f}, Train reward margins {row['train_reward_margin']:.3f}, "
            f"Val reward margins {row['val_reward_margin']:.3f}")
        warning = drift_warning(row)
        if warning and not warned:
            warned = True
            say(warning)
        if world.is_main:
            run.write_metrics(state["rows"])

    from tqdm import tqdm

    trained.train()
    if state["step"] == 0 and not state["rows"]:
        evaluate()
    bar = tqdm(total=steps, initial=state["step"], desc="dpo", unit="step", dynamic_ncols=True, disable=not world.is_main)
    while state["step"] < steps:
        # One global order; each step takes batch x world pairs, rank r its r-th slice.
        mine = slice(world.rank * config.batch_size, (world.rank + 1) * config.batch_size)
        batches = [batch[mine] for batch in global_batches(state["epoch"])]
        while state["batch_in_epoch"] < len(batches) and state["step"] < steps:
            started = time.perf_counter()
            lr = lr_at(state["step"], schedule, steps)
            optimizer.zero_grad(set_to_none=True)
            indices = batches[state["batch_in_epoch"]]
            loss_sum, chosen_token_sum, sums = pair_terms(trained, indices, train, ref_train)
            total_tokens = all_reduce_sum(sums["chosen_tokens"], world, device)
            loss = loss_sum / global_batch
            if config.sft_weight:
                loss = loss + config.sft_weight * (-chosen_token_sum / total_tokens)
            row = row_from(sums)
            if not math.isfinite(row["loss"]):
                raise UserError(f"DPO loss became {row['loss']} at step {state['step'] + 1}; lower --lr or --beta")
            (loss * world.size).backward()  # DDP averages gradients over ranks: this makes it the sum
            if config.clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in trained.parameters() if p.requires_grad], config.clip)
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
                save_checkpoint(run, state, **parts)
        if state["batch_in_epoch"] >= len(batches):
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            save_checkpoint(run, state, **parts)
    bar.close()
    if state["rows"][-1]["kind"] != "eval":
        evaluate()
    if world.is_main:
        _finish(model.cpu(), loaded, config, state, run)
    distributed.barrier(world)
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
