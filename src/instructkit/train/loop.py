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
same update (up to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instructkit.data.batching import batches_in_order, chapter_shuffle_order, collate, length_grouped_batches
from instructkit.data.prompts import PromptStyle
from instructkit.data.tokenize import IGNORE_INDEX, EncodedExample
from instructkit.train.config import TrainConfig
from instructkit.train.loss import fused_head_cross_entropy_sum


def supervised_loss_sum(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised targets, with the head applied only there, in
    chunks (see loss.fused_head_cross_entropy_sum).

    inputs, targets: (B, T). hidden: (B, T, C) -> selected (N, C) -> loss ()."""
    head = model.lm_head
    plain = type(head) is not torch.nn.Linear or head.bias is not None  # a wrapped head: the plain way
    # Made before the forward pass, so that its backward runs after the embedding lookup's (see
    # _HeadGradientLast): only when the tied weight trains.
    weight = head.weight if plain or not (torch.is_grad_enabled() and head.weight.requires_grad) \
        else _HeadGradientLast.apply(head.weight)
    hidden = model(inputs, return_hidden=True)
    supervised = targets != IGNORE_INDEX
    count = int(supervised.sum())
    if plain:
        return F.cross_entropy(model.head(hidden[supervised]), targets[supervised], reduction="sum"), count
    return fused_head_cross_entropy_sum(hidden[supervised], weight, targets[supervised]), count


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


def epoch_batches(examples: list[EncodedExample], config: TrainConfig, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a pure function of (seed, epoch), so a resumed run sees
    exactly the order an uninterrupted one would. The order is made for the effective batch
    (batch_size x grad_accum), then each effective batch is cut into grad_accum micro-batches, so
    batch 8 and batch 1 with --grad-accum 8 put the same examples into every optimizer step."""
    seed = config.seed + epoch
    effective = config.batch_size * config.grad_accum
    if config.batching == "chapter":
        steps = batches_in_order(chapter_shuffle_order(len(examples), seed), effective, drop_last=True)
    else:
        lengths = [len(example) for example in examples]
        steps = length_grouped_batches(lengths, effective, seed=seed, drop_last=True)
    return [step[start : start + config.batch_size] for step in steps for start in range(0, effective, config.batch_size)]


def eval_batches(examples: list[EncodedExample], batch_size: int, limit: int) -> list[list[int]]:
    """Fixed evaluation examples (the first `limit` batches in file order), so successive
    evaluations compare like with like. The loss is token-weighted over all of them, so they are
    regrouped by length: the same examples and loss, with almost no padding to compute."""
    chosen = range(min(len(examples), limit * batch_size))
    by_length = sorted(chosen, key=lambda i: len(examples[i]))
    return batches_in_order(by_length, batch_size, drop_last=False)


@torch.no_grad()
def evaluate_loss(model, examples, batches, pad_id: int) -> float:
    """Token-weighted mean loss over the given batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        inputs, targets = collate([examples[i] for i in batch], pad_id=pad_id)
        loss, n = supervised_loss_sum(model, inputs, targets)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate as a pure function of the optimizer step (0-based)."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "cosine":
        progress = (step - config.warmup) / max(1, total_steps - config.warmup)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not on norms, biases or LoRA-free vectors)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each tensor in place: no optimizer-sized temporaries (the default
    # multi-tensor path allocates some, which for Gemma's 168M-value embedding is ~0.7 GB each).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=True)


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
) -> StepResult:
    """One optimizer step over `micro_batches` (the accumulation group)."""
    collated = [collate([examples[i] for i in batch], pad_id=pad_id) for batch in micro_batches]
    total_supervised = sum(int((targets != IGNORE_INDEX).sum()) for _, targets in collated)
    real = sum(sum(len(examples[i]) - 1 for i in batch) for batch in micro_batches)
    padded = sum(inputs.numel() for inputs, _ in collated)
    if total_supervised == 0:  # e.g. every example truncated before its response: nothing to learn
        return StepResult(float("nan"), 0, real, padded, skipped=True)
    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0
    for inputs, targets in collated:
        loss_sum, _ = supervised_loss_sum(model, inputs, targets)
        (loss_sum / max(total_supervised, 1)).backward()
        total_loss += float(loss_sum.detach())
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return StepResult(total_loss / total_supervised, total_supervised, real, padded)


def sample_text(model, tokenizer, style: PromptStyle, record: dict, max_new_tokens: int = 50) -> str:
    from instructkit.data.tokenize import end_token_id
    from instructkit.generate import generate

    was_training = model.training
    model.eval()
    ids = tokenizer.encode(style.prompt(record))
    result = generate(model, tokenizer, [ids], max_new_tokens=max_new_tokens,
                      stop_ids=sorted({tokenizer.eos_id, end_token_id(style, tokenizer)}))[0]
    model.train(was_training)
    return result.text


def steps_per_epoch(num_examples: int, config: TrainConfig) -> int:
    return (num_examples // config.batch_size) // config.grad_accum


def total_steps(num_examples: int, config: TrainConfig) -> int:
    steps = steps_per_epoch(num_examples, config) * config.epochs
    return min(steps, config.max_steps) if config.max_steps is not None else steps
