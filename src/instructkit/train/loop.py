"""Supervised fine-tuning's objective for the one loop (train/fit.py): the loss on a batch of
instruction examples, its evaluation and its per-epoch sample, for full and LoRA fine-tuning alike
(they differ only in which parameters train).

Speed on a CPU comes from three things, none of which changes the loss:
  - the LM head and cross-entropy run only at supervised positions (Gemma's head has 262,144
    rows: at unsupervised positions it would be most of the cost and memory), fused and chunked
    (train/loss.py: no full logits tensor, gradients made in the forward pass, logits computed
    vocab-major, where CPU matmuls are ~1.7x faster for these shapes);
  - length-grouped batches, so almost no compute goes to padding (`--batching chapter` keeps
    the chapter's shuffled order instead), or packed micro-batches (`--packing`: the same
    examples laid end to end in fewer rows, attention kept inside each; data/batching.pack);
  - fp32 throughout (bf16 matmuls are ~300x slower on CPUs without AMX).

The loss of an optimizer step is the mean over all supervised tokens of all its micro-batches,
and the batch order is made for the effective batch (batch x accumulation), so batch 8 x
accumulation 1 and batch 1 x accumulation 8 put the same examples into each step and give the
same update (up to float rounding). With several processes (train/distributed.py) the order is
made for the global batch and each rank takes its slice of every micro-batch, so N processes
train on exactly what one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instructkit.data.batching import batches_in_order, chapter_shuffle_order, collate, length_grouped_batches, pack
from instructkit.data.prompts import PromptStyle
from instructkit.data.tokenize import IGNORE_INDEX, EncodedExample
from instructkit.train.config import TrainConfig
from instructkit.train.distributed import SINGLE, World, all_reduce_max, all_reduce_sum, is_sharded, shard, unwrap
from instructkit.train.fit import Session, autocast, build_optimizer, optimizer_step, rank_micro_batches  # noqa: F401
from instructkit.train.loss import fused_head_cross_entropy_sum


def supervised_loss_sum(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                        positions: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised targets, with the head applied only there, in
    chunks (see loss.fused_head_cross_entropy_sum).

    inputs, targets: (B, T); positions (B, T) of packed rows (data/batching.pack), None otherwise.
    hidden: (B, T, C) -> selected (N, C) -> loss (). `model` may be a DDP / FSDP wrapper: the
    forward pass goes through it, the head is read from the model inside."""
    head = unwrap(model).lm_head
    # A wrapped head (LoRA, quantized) or one that is more than the linear map (Gemma 2's soft cap):
    # the plain way, through the model's own head.
    plain = type(head) is not torch.nn.Linear or head.bias is not None or not getattr(unwrap(model), "plain_head", True)
    sharded = is_sharded(model)
    # Made before the forward pass, so that its backward runs after the embedding lookup's (see
    # _HeadGradientLast): only when the tied weight trains.
    weight = head.weight if plain or sharded or not (torch.is_grad_enabled() and head.weight.requires_grad) \
        else _HeadGradientLast.apply(head.weight)
    hidden = model(inputs, return_hidden=True) if positions is None else model(inputs, positions=positions, return_hidden=True)
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
    """This rank's micro-batches of one epoch (see step_orders), grad_accum of them per step."""
    return rank_micro_batches(step_orders(examples, config, epoch, world), config.batch_size, config.grad_accum, world)


def step_orders(examples: list[EncodedExample], config: TrainConfig, epoch: int, world: World = SINGLE) -> list[list[int]]:
    """The global step batches of one epoch: a pure function of (seed, epoch), so a resumed run
    sees exactly the order an uninterrupted one would. The order is made for the effective batch
    (batch_size x processes x grad_accum), so batch 8 and batch 1 with --grad-accum 8 put the same
    examples into every optimizer step."""
    seed = config.seed + epoch
    effective = config.batch_size * world.size * config.grad_accum
    if config.batching == "chapter":
        return batches_in_order(chapter_shuffle_order(len(examples), seed), effective, drop_last=True)
    lengths = [len(example) for example in examples]
    return length_grouped_batches(lengths, effective, seed=seed, drop_last=True)


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


@dataclass
class StepResult:
    loss: float
    supervised_tokens: int
    real_tokens: int  # non-padding input tokens
    padded_tokens: int  # inputs.numel(), what the chapter counts as "tokens seen"
    skipped: bool = False  # no supervised token in the whole step: no update was made


@dataclass
class _StepWork:
    """One step's micro-batches as tensors, with the step's supervised tokens over all ranks."""

    collated: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # inputs, targets, positions
    total_supervised: int
    real: int
    padded: int

    @property
    def skip(self) -> bool:  # e.g. every example truncated before its response: nothing to learn
        return self.total_supervised == 0


class SupervisedSteps:
    """The loss of a step: the sum of token losses over every micro-batch of every rank divided by
    the supervised tokens of all of them (one all-reduce of the count); DDP averages gradients
    over ranks, so each rank's part is scaled by the world size to make that average the sum."""

    name = "fine-tune"

    def __init__(self, examples: list[EncodedExample], pad_id: int, *, world: World = SINGLE,
                 device: torch.device | None = None, precision: str = "fp32", packing: bool = False,
                 pack_length: int | None = None):
        self.examples, self.pad_id = examples, pad_id
        self.world, self.device, self.precision = world, device, precision
        self.packing, self.pack_length = packing, pack_length

    def _tensors(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A micro-batch's inputs, targets and positions: packed (--packing: the same examples in
        fewer rows, positions restarting per example) or padded to its longest (positions 0..T-1)."""
        chosen = [self.examples[i] for i in batch]
        if self.packing:
            return pack(chosen, pad_id=self.pad_id, row_length=self.pack_length)
        return (*collate(chosen, pad_id=self.pad_id), None)

    def prepare(self, micro_batches: list[list[int]]) -> _StepWork:
        examples, world = self.examples, self.world
        collated = [self._tensors(batch) for batch in micro_batches]
        local_supervised = sum(int((targets != IGNORE_INDEX).sum()) for _, targets, _ in collated)
        total = int(global_token_count(local_supervised, world, self.device))
        real = sum(sum(len(examples[i]) - 1 for i in batch) for batch in micro_batches)
        return _StepWork(collated, total, real, sum(inputs.numel() for inputs, _, _ in collated))

    def micro_loss(self, model, index: int, work: _StepWork) -> tuple[torch.Tensor, float]:
        inputs, targets, positions = work.collated[index]
        with autocast(self.device, self.precision):
            loss_sum, _ = supervised_loss_sum(model, inputs.to(self.device), targets.to(self.device),
                                              None if positions is None else positions.to(self.device))
        return loss_sum * (self.world.size / work.total_supervised), float(loss_sum.detach())

    def step_row(self, parts: list[float], work: _StepWork) -> tuple[dict, dict]:
        if work.skip:
            row = {"loss": None, "real_tokens": work.real, "supervised_tokens": 0, "skipped": True}
            return row, {"tokens_seen": work.padded, "skipped_steps": 1}
        world, device = self.world, self.device
        total_loss = all_reduce_sum(sum(parts, 0.0), world, device)
        real, padded = int(all_reduce_sum(work.real, world, device)), int(all_reduce_sum(work.padded, world, device))
        row = {"loss": total_loss / work.total_supervised, "real_tokens": real, "supervised_tokens": work.total_supervised}
        return row, {"tokens_seen": padded, "supervised_seen": work.total_supervised}

    def postfix(self, row: dict) -> dict:
        loss = float("nan") if row["loss"] is None else row["loss"]
        return {"loss": f"{loss:.3f}", "lr": f"{row['lr']:.1e}", "tok_s": f"{row['real_tokens'] / row['seconds']:.0f}"}


class SupervisedObjective(SupervisedSteps):
    """finetune's objective: the steps above, the token-weighted train and validation losses on
    fixed batches (plus `score_validation`'s metrics, one process only), a greedy sample."""

    def __init__(self, train, val, tokenizer, style: PromptStyle, config: TrainConfig, session: Session, *,
                 sample_record: dict, score_validation=None):
        super().__init__(train, tokenizer.pad_id, world=session.world, device=session.device, precision=session.precision,
                         packing=config.packing, pack_length=config.pack_length)
        self.train_size, self.val, self.config = len(train), val, config
        self.tokenizer, self.style, self.sample_record, self.score_validation = tokenizer, style, sample_record, score_validation
        self.train_eval = eval_batches(train, config.batch_size, config.eval_batches)
        self.val_eval = eval_batches(val, config.batch_size, config.eval_batches)

    def step_orders(self, epoch: int) -> list[list[int]]:
        return step_orders(self.examples, self.config, epoch, self.world)

    def evaluate(self, session: Session, state: dict) -> dict:
        measure = dict(world=self.world, device=self.device, precision=self.precision)
        train_loss = evaluate_loss(session.trained, self.examples, self.train_eval, self.pad_id, **measure)
        val_loss = evaluate_loss(session.trained, self.val, self.val_eval, self.pad_id, **measure)
        row = {"tokens_seen": state["tokens_seen"], "train_loss": train_loss, "val_loss": val_loss,
               "elapsed_s": state["elapsed_s"]}
        if self.score_validation is not None and self.world.is_main and not self.world.distributed:
            session.model.eval()
            row.update(self.score_validation(session.model, self.tokenizer, self.style))
            session.model.train()
        return row

    def eval_message(self, row: dict) -> str:
        return "".join(f", {name.removeprefix('val_')} {value:.3f}" for name, value in row.items()
                       if name.startswith("val_") and name != "val_loss")

    def notes(self, row: dict) -> list[str]:
        return []

    def sample(self, session: Session) -> str | None:
        if not self.config.sample_prompt or self.config.strategy == "fsdp":
            return None  # rank 0 alone samples, from the plain model: no collective while the others wait
        return sample_text(session.model, self.tokenizer, self.style, self.sample_record)


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
    packing: bool = False,
    pack_length: int | None = None,
) -> StepResult:
    """One optimizer step over `micro_batches` (this rank's share of the accumulation group),
    outside a run: fit's step with the supervised loss (SupervisedSteps)."""
    device = device or next(unwrap(model).parameters()).device
    session = Session(unwrap(model), model, optimizer, world, device, precision)
    steps = SupervisedSteps(examples, pad_id, world=world, device=device, precision=precision, packing=packing,
                            pack_length=pack_length)
    row, counts = optimizer_step(session, steps, micro_batches, lr=lr, clip=clip)
    loss = float("nan") if row["loss"] is None else row["loss"]
    return StepResult(loss, row["supervised_tokens"], row["real_tokens"], counts["tokens_seen"], row.get("skipped", False))


def global_token_count(local: int, world: World, device) -> float:
    """Supervised tokens of a step over all ranks: the denominator of its loss."""
    return all_reduce_sum(local, world, device)


def sample_text(model, tokenizer, style: PromptStyle, record: dict, max_new_tokens: int = 50) -> str:
    from instructkit.decode.generate import generate

    was_training = model.training
    model.eval()
    ids = style.prompt_ids(record, tokenizer)
    result = generate(model, tokenizer, [ids], max_new_tokens=max_new_tokens,
                      stop_ids=style.stop_ids(tokenizer))[0]
    model.train(was_training)
    return result.text
