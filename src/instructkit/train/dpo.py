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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instructkit.data.batching import batches_in_order, collate, length_grouped_batches
from instructkit.data.preferences import EncodedPair, encode_pairs, load_preferences
from instructkit.data.tokenize import IGNORE_INDEX
from instructkit.devices import resolve_device
from instructkit.errors import UserError
from instructkit.runs import RunFolder
from instructkit.train import distributed
from instructkit.train.config import LOSSES, REDUCTIONS, DPOConfig  # noqa: F401 (DPOConfig's home was here)
from instructkit.train.distributed import SINGLE, World, all_reduce_sum, shard, unwrap
from instructkit.train.fit import Session, autocast, say, steps_per_epoch, total_steps
from instructkit.train.loss import sequence_logprob_sums
from instructkit.train.runner import (check_existing, check_memory, fit_and_write, make_session, make_trainable, save_trained,
                                     start_or_resume)


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
    inner = unwrap(model)
    if getattr(inner, "plain_head", True):
        sums = sequence_logprob_sums(hidden[supervised], inner.lm_head.weight, targets[supervised], rows, inputs.shape[0])
    else:  # a soft-capped head (Gemma 2): the logits through the model's own head
        logprobs = torch.log_softmax(inner.head(hidden[supervised]).float(), dim=-1)
        picked = logprobs.gather(1, targets[supervised][:, None])[:, 0]
        sums = torch.zeros(inputs.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
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


# The objective ------------------------------------------------------------------------------
_SUMS = ("dpo_loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen",
         "logp_rejected", "ref_logp_chosen", "ref_logp_rejected", "chosen_nll", "chosen_tokens", "pairs")


@dataclass
class _PairWork:
    """One step's micro-batches of pairs, with the chosen responses' tokens over all ranks."""

    micro_batches: list[list[int]]
    chosen_tokens: float
    skip: bool = False


class DPOObjective:
    """dpo's objective for the one loop (train/fit.py): a step's loss is the mean DPO loss over
    all its pairs (every rank and micro-batch) plus sft_weight x the mean NLL of all their chosen
    tokens; evaluation measures losses, rewards and log-probs on the first pairs of each split."""

    name = "dpo"

    def __init__(self, train, val, pad_id: int, config: DPOConfig, session: Session, state: dict, *, reference=None,
                 ref_train=None, ref_val=None):
        self.train, self.val, self.pad_id, self.config, self.state = train, val, pad_id, config, state
        self.world, self.device, self.precision = session.world, session.device, session.precision
        self.reference, self.ref_train, self.ref_val = reference, ref_train, ref_val
        self.train_size = len(train)
        self.step_pairs = config.batch_size * self.world.size * config.grad_accum
        self.evaluated = config.eval_batches * config.batch_size * self.world.size  # the first pairs of each split
        self.warned = False  # the drift warning is said once per process

    def step_orders(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.train, self.step_pairs, batching=self.config.batching, seed=self.config.seed + epoch)

    def prepare(self, micro_batches: list[list[int]]) -> _PairWork:
        local = float(sum(self.train[i].chosen.num_supervised for batch in micro_batches for i in batch))
        return _PairWork(micro_batches, all_reduce_sum(local, self.world, self.device))

    def micro_loss(self, model, index: int, work: _PairWork) -> tuple[torch.Tensor, dict]:
        loss_sum, chosen_token_sum, sums = self.pair_terms(model, work.micro_batches[index], self.train, self.ref_train)
        loss = loss_sum / self.step_pairs
        if self.config.sft_weight:
            loss = loss + self.config.sft_weight * (-chosen_token_sum / work.chosen_tokens)
        return loss * self.world.size, sums  # DDP averages gradients over ranks: this makes it the sum

    def step_row(self, parts: list[dict], work: _PairWork) -> tuple[dict, dict]:
        row = self.row_from({name: sum(part[name] for part in parts) for name in _SUMS})
        if not math.isfinite(row["loss"]):
            raise UserError(f"DPO loss became {row['loss']} at step {self.state['step'] + 1}; lower --lr or --beta")
        return row, {}

    def pair_terms(self, net, indices: list[int], pairs, refs):
        """This rank's pairs `indices`: the summed DPO losses, the chosen responses' summed token
        log-probs (for the SFT term), and the metrics' sums over the pairs."""
        config = self.config
        with autocast(self.device, self.precision):
            chosen, rejected, logps, counts = _pair_logprobs(net, [pairs[i] for i in indices], self.pad_id,
                                                             config.logp_reduction, self.device)
            if refs is not None:
                ref_c, ref_r = refs[indices, 0], refs[indices, 1]
            else:
                with torch.no_grad():
                    ref_c, ref_r, _, _ = _pair_logprobs(self.reference, [pairs[i] for i in indices], self.pad_id,
                                                        config.logp_reduction, self.device)
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

    def row_from(self, sums: dict) -> dict:
        """Means over all ranks' pairs: the loss is the step's (DPO mean + SFT weight x token-mean NLL)."""
        sums = {name: all_reduce_sum(value, self.world, self.device) for name, value in sums.items()}
        pairs = max(sums.pop("pairs"), 1.0)
        tokens = max(sums.pop("chosen_tokens"), 1.0)
        nll = sums.pop("chosen_nll") / tokens
        row = {name: value / pairs for name, value in sums.items()}
        row["loss"] = row.pop("dpo_loss") + self.config.sft_weight * nll
        row["reward_margin_unscaled"] = row["reward_margin"] / self.config.beta
        return row

    @torch.no_grad()
    def evaluate(self, session: Session, state: dict) -> dict:
        session.trained.eval()
        row = {}
        for name, pairs, refs in (("train", self.train, self.ref_train), ("val", self.val, self.ref_val)):
            mine = shard(list(range(len(pairs)))[: self.evaluated], self.world)
            totals: dict = {}
            for start in range(0, len(mine), self.config.batch_size):
                _, _, sums = self.pair_terms(session.model, mine[start : start + self.config.batch_size], pairs, refs)
                totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
            row.update({f"{name}_{k}": v for k, v in self.row_from({k: totals.get(k, 0.0) for k in _SUMS}).items()})
        session.trained.train()
        return row

    def eval_message(self, row: dict) -> str:
        return f", Train reward margins {row['train_reward_margin']:.3f}, Val reward margins {row['val_reward_margin']:.3f}"

    def notes(self, row: dict) -> list[str]:
        warning = drift_warning(row)
        if warning is None or self.warned:
            return []
        self.warned = True
        return [warning]

    def sample(self, session: Session) -> None:
        return None

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.3f}", "margin": f"{row['reward_margin']:.3f}"}


def start_model(config: DPOConfig):
    """The starting model and its prompt style, through the one loader (a run folder keeps its own
    style; decode/load.py)."""
    from instructkit.decode.load import load_start

    ready = load_start(config.start, prompt_style=config.prompt_style, seed=config.seed)
    return ready.loaded, ready.style


# The run ----------------------------------------------------------------------------------
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


def _dpo(config: DPOConfig, resume: bool, device: torch.device, world: World) -> RunFolder:
    run = RunFolder(config.out)
    tell = say if world.is_main else (lambda message: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    check_existing(run, config, resume, lambda: DPOConfig.from_dict(run.config()))
    if run.has_config() and run.is_finished:
        tell(f"{run}: DPO already finished; nothing to resume")
        return run
    prefs = load_preferences(config.data, skip_invalid=config.skip_invalid)
    loaded, style = start_model(config)
    config.prompt_style = style.name
    torch.manual_seed(config.seed + world.rank)
    model, tokenizer = loaded.model, loaded.tokenizer
    train, train_report = encode_pairs(prefs.splits.train, style, tokenizer, append_eos=config.append_eos,
                                       max_length=config.max_length)
    val, _ = encode_pairs(prefs.splits.val, style, tokenizer, append_eos=config.append_eos, max_length=config.max_length)
    tell(f"Preference pairs: train {len(train)}, validation {len(val)}; dropped: {prefs.identical} with identical "
         f"responses, {train_report.not_prefix} whose prompt is no token prefix, {train_report.truncated_away} "
         f"truncated to an empty response" + (f", {prefs.skipped_invalid} invalid" if prefs.skipped_invalid else ""))
    if steps_per_epoch(len(train), config, world) == 0 or not val:
        raise UserError(f"{config.data}: {len(train)} training and {len(val)} validation pairs are too few for batch "
                        f"{config.batch_size} x {config.grad_accum} x {world.size} process(es)")

    _disable_dropout(model, tell)
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    make_trainable(model, config)
    model.to(device)
    reference.to(device)
    longest = max(len(example.input_ids) for pair in train for example in (pair.chosen, pair.rejected))
    check_memory(model, config, longest, world, device, tell, sequences_per_example=2)
    refs = _precomputed_references(reference, train, val, tokenizer.pad_id, config, world, device) \
        if config.precompute_ref else {"reference": reference}
    session = make_session(model, config, world, device)
    state = start_or_resume(session, run, config, style, tell)
    objective = DPOObjective(train, val, tokenizer.pad_id, config, session, state, **refs)
    fit_and_write(session, objective, config, run, state, lambda trained: _finish(trained, loaded, config, state, run))
    return run


def _precomputed_references(reference, train, val, pad_id: int, config: DPOConfig, world: World, device) -> dict:
    """The reference's log-probs of the pairs the run will read (a --max-steps run short of an
    epoch needs a fraction), computed once: the reference model itself is then let go."""
    global_batch = config.batch_size * world.size
    evaluated = config.eval_batches * global_batch  # evaluation reads the first pairs of each split
    step_pairs = global_batch * config.grad_accum
    per_epoch, steps = steps_per_epoch(len(train), config, world), total_steps(len(train), config, world)
    used = set(range(min(evaluated, len(train))))
    for epoch in range(math.ceil(steps / per_epoch)):
        for batch in epoch_batches(train, step_pairs, batching=config.batching, seed=config.seed + epoch)[: steps - epoch * per_epoch]:
            used.update(batch)
    common = dict(world=world, device=device)
    ref_train = reference_logprobs(reference, train, pad_id, config.logp_reduction, config.batch_size,
                                   needed=sorted(used), **common)
    ref_val = reference_logprobs(reference, val, pad_id, config.logp_reduction, config.batch_size,
                                 needed=list(range(min(evaluated, len(val)))), **common)
    return {"ref_train": ref_train, "ref_val": ref_val}


def _finish(model, loaded, config: DPOConfig, state: dict, run: RunFolder) -> None:
    from instructkit.train.plot import plot_dpo

    save_trained(model, config, run, loaded.tokenizer_ref)
    evals = [row for row in state["rows"] if row["kind"] == "eval"]
    plot_dpo(evals, run.loss_plot, run.path / "reward-margins-plot")
    run.remove_checkpoints()
    first, last = evals[0], evals[-1]
    say(f"Done: {state['step']} DPO steps in {state['elapsed_s']:.0f} s; validation reward accuracy "
        f"{first['val_reward_accuracy']:.1%} -> {last['val_reward_accuracy']:.1%}, margin "
        f"{first['val_reward_margin']:.3f} -> {last['val_reward_margin']:.3f}. Run folder: {run}")
