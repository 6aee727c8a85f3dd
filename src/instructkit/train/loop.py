"""The one training loop, for full and LoRA fine-tuning alike (they differ only in which
parameters train).

Speed on a CPU comes from three things, none of which changes the loss:
  - the LM head and cross-entropy run only at supervised positions (Gemma's head has 262,144
    rows: at unsupervised positions it would be most of the cost and memory), fused and chunked
    (train/loss.py: no full logits tensor, gradients made in the forward pass, logits computed
    vocab-major, where CPU matmuls are ~1.7x faster for these shapes);
  - length-grouped batches, so almost no compute goes to padding (`--batching chapter` keeps
    the chapter's shuffled order instead);
  - fp32 throughout (bf16 matmuls are ~300x slower on CPUs without AMX).

The loss of an optimizer step is the mean over all supervised tokens of all its micro-batches,
and the batch order is made for the effective batch (batch x accumulation), so batch 8 x
accumulation 1 and batch 1 x accumulation 8 put the same examples into each step and give the
same update (up to float rounding). With several processes (train/distributed.py) the order is
made for the global batch and each rank takes its slice of every micro-batch, so N processes
train on exactly what one process would.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instructkit.data.batching import batches_in_order, chapter_shuffle_order, collate, length_grouped_batches
from instructkit.data.prompts import PromptStyle
from instructkit.data.tokenize import IGNORE_INDEX, EncodedExample
from instructkit.train.config import TrainConfig
from instructkit.train.distributed import SINGLE, World, all_reduce_max, all_reduce_sum, is_sharded, shard, unwrap
from instructkit.train.loss import fused_head_cross_entropy_sum


def supervised_loss_sum(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised targets, with the head applied only there, in
    chunks (see loss.fused_head_cross_entropy_sum).

    inputs, targets: (B, T). hidden: (B, T, C) -> selected (N, C) -> loss (). `model` may be a
    DDP / FSDP wrapper: the forward pass goes through it, the head is read from the model inside."""
    head = unwrap(model).lm_head
    plain = type(head) is not torch.nn.Linear or head.bias is not None  # a wrapped head: the plain way
    sharded = is_sharded(model)
    # Made before the forward pass, so that its backward runs after the embedding lookup's (see
    # _HeadGradientLast): only when the tied weight trains.
    weight = head.weight if plain or sharded or not (torch.is_grad_enabled() and head.weight.requires_grad) \
        else _HeadGradientLast.apply(head.weight)
    hidden = model(inputs, return_hidden=True)
    if sharded:  # FSDP2 keeps the root's weights (the head among them) gathered after its forward
        weight = head.weight
    supervised = targets != IGNORE_INDEX
    count = int(supervised.sum())
    if plain:
        return F.cross_entropy(unwrap(model).head(hidden[supervised]), targets[supervised], reduction="sum"), count
    return fused_head_cross_entropy_sum(hidden[supervised].float(), weight, targets[supervised]), count


class _HeadGradientLast(torch.autograd.Function):
    """Identity on the tied head/embedding weight, applied before the forward pass.

    The tied weight gets two gradients: the head's, dense (V, C), and the embedding lookup's,
    sparse (rows of the batch's tokens). Autograd sums them in one buffer before accumulating,
    and its order matters: dense first, then sparse, makes it allocate a new (V, C) sum (a 150 MB
    copy a step for GPT-2, 670 MB for Gemma: ~5% of a GPT-2 step); sparse first, then dense, adds
    the rows into the dense gradient in place. Autograd runs ready nodes latest-created first, so
    a node created before the embedding lookup delivers the head's gradient after it."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad


def epoch_batches(examples: list[EncodedExample], config: TrainConfig, epoch: int, world: World = SINGLE) -> list[list[int]]:
    """The micro-batches of one epoch: a pure function of (seed, epoch), so a resumed run sees
    exactly the order an uninterrupted one would. The order is made for the effective batch
    (batch_size x grad_accum), then each effective batch is cut into grad_accum micro-batches, so
    batch 8 and batch 1 with --grad-accum 8 put the same examples into every optimizer step."""
    seed = config.seed + epoch
    micro = config.batch_size * world.size  # one micro-batch of every rank together
    effective = micro * config.grad_accum
    if config.batching == "chapter":
        steps = batches_in_order(chapter_shuffle_order(len(examples), seed), effective, drop_last=True)
    else:
        lengths = [len(example) for example in examples]
        steps = length_grouped_batches(lengths, effective, seed=seed, drop_last=True)
    rank_slice = slice(world.rank * config.batch_size, (world.rank + 1) * config.batch_size)
    return [step[start : start + micro][rank_slice] for step in steps for start in range(0, effective, micro)]


def eval_batches(examples: list[EncodedExample], batch_size: int, limit: int) -> list[list[int]]:
    """Fixed evaluation examples (the first `limit` batches in file order), so successive
    evaluations compare like with like. The loss is token-weighted over all of them, so they are
    regrouped by length: the same examples and loss, with almost no padding to compute."""
    chosen = range(min(len(examples), limit * batch_size))
    by_length = sorted(chosen, key=lambda i: len(examples[i]))
    return batches_in_order(by_length, batch_size, drop_last=False)


@torch.no_grad()
def evaluate_loss(model, examples, batches, pad_id: int, *, world: World = SINGLE, device=None,
                  precision: str = "fp32") -> float:
    """Token-weighted mean loss over the examples of the given batches. Across processes each
    example is evaluated by exactly one rank (regrouped by length there) and the sums are
    all-reduced, so the result is the one-process one."""
    was_training = model.training
    model.eval()
    device = device or next(unwrap(model).parameters()).device
    mine = shard([i for batch in batches for i in batch], world)
    mine.sort(key=lambda i: len(examples[i]))
    size = max(len(batch) for batch in batches) if batches else 1
    local = [mine[start : start + size] for start in range(0, len(mine), size)]
    rounds = int(all_reduce_max(len(local), world, device)) if world.distributed else len(local)
    total, count = 0.0, 0
    for index in range(rounds):  # equal rounds on every rank: a sharded model gathers in each forward
        batch = local[index] if index < len(local) else local[0] if local else mine[:1]
        inputs, targets = collate([examples[i] for i in batch], pad_id=pad_id)
        with autocast(device, precision):
            loss, n = supervised_loss_sum(model, inputs.to(device), targets.to(device))
        if index < len(local):
            total, count = total + float(loss), count + n
    total, count = all_reduce_sum(total, world, device), all_reduce_sum(count, world, device)
    model.train(was_training)
    return total / max(count, 1)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked; fp32 everywhere else (bf16 is ~300x slower on these CPUs
    and refused there by the config)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate as a pure function of the optimizer step (0-based)."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "cosine":
        progress = (step - config.warmup) / max(1, total_steps - config.warmup)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr


def build_optimizer(model: torch.nn.Module, config: TrainConfig, *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not on norms, biases or LoRA-free vectors)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each tensor in place: no optimizer-sized temporaries (the default
    # multi-tensor path allocates some, which for Gemma's 168M-value embedding is ~0.7 GB each).
    # (FSDP's sharded parameters take the plain per-tensor path.)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=fused, foreach=False if not fused else None)


@dataclass
class StepResult:
    loss: float
    supervised_tokens: int
    real_tokens: int  # non-padding input tokens
    padded_tokens: int  # inputs.numel(), what the chapter counts as "tokens seen"
    skipped: bool = False  # no supervised token in the whole step: no update was made


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: list[EncodedExample],
    micro_batches: list[list[int]],
    *,
    pad_id: int,
    lr: float,
    clip: float | None,
    world: World = SINGLE,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> StepResult:
    """One optimizer step over `micro_batches` (this rank's share of the accumulation group).

    The loss is the sum of token losses over every micro-batch of every rank divided by the
    supervised tokens of all of them (one all-reduce of the count); DDP averages gradients over
    ranks, so each rank's part is scaled by the world size to make that average the sum."""
    device = device or next(unwrap(model).parameters()).device
    collated = [collate([examples[i] for i in batch], pad_id=pad_id) for batch in micro_batches]
    local_supervised = sum(int((targets != IGNORE_INDEX).sum()) for _, targets in collated)
    total_supervised = int(global_token_count(local_supervised, world, device))
    real = sum(sum(len(examples[i]) - 1 for i in batch) for batch in micro_batches)
    padded = sum(inputs.numel() for inputs, _ in collated)
    if total_supervised == 0:  # e.g. every example truncated before its response: nothing to learn
        return StepResult(float("nan"), 0, real, padded, skipped=True)
    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0
    for index, (inputs, targets) in enumerate(collated):
        last = index == len(collated) - 1
        # Gradients are all-reduced once per step, on its last micro-batch.
        quiet = model.no_sync() if world.distributed and not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with quiet:
            with autocast(device, precision):
                loss_sum, _ = supervised_loss_sum(model, inputs.to(device), targets.to(device))
            (loss_sum * (world.size / total_supervised)).backward()
        total_loss += float(loss_sum.detach())
    total_loss = all_reduce_sum(total_loss, world, device)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return StepResult(total_loss / total_supervised, total_supervised, int(all_reduce_sum(real, world, device)),
                      int(all_reduce_sum(padded, world, device)))


def global_token_count(local: int, world: World, device) -> float:
    """Supervised tokens of a step over all ranks: the denominator of its loss."""
    return all_reduce_sum(local, world, device)


def sample_text(model, tokenizer, style: PromptStyle, record: dict, max_new_tokens: int = 50) -> str:
    from instructkit.decode.generate import generate

    was_training = model.training
    model.eval()
    ids = tokenizer.encode(style.prompt(record))
    result = generate(model, tokenizer, [ids], max_new_tokens=max_new_tokens,
                      stop_ids=style.stop_ids(tokenizer))[0]
    model.train(was_training)
    return result.text


def steps_per_epoch(num_examples: int, config: TrainConfig, world: World = SINGLE) -> int:
    return (num_examples // (config.batch_size * world.size)) // config.grad_accum


def total_steps(num_examples: int, config: TrainConfig, world: World = SINGLE) -> int:
    steps = steps_per_epoch(num_examples, config, world) * config.epochs
    return min(steps, config.max_steps) if config.max_steps is not None else steps
