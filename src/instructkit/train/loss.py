"""Losses: mean cross-entropy over supervised targets, and a fused LM head + cross-entropy.

Targets come from the collate function, already shifted by one, with IGNORE_INDEX wherever no
loss counts. Averaging is over supervised targets only, so padding never dilutes the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from instructkit.data.tokenize import IGNORE_INDEX

# Rows of logits alive at once in the fused head: 2**25 floats (128 MB), i.e. 128 rows of
# Gemma's 262,144-token vocabulary or ~670 of GPT-2's.
LOGITS_CHUNK_ELEMENTS = 2**25


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """logits (..., V), targets (...) with IGNORE_INDEX for masked positions."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def _chunk_rows(vocab: int) -> int:
    return max(16, LOGITS_CHUNK_ELEMENTS // vocab)


def _head_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         need_hidden: bool, need_weight: bool, per_position: bool = False):
    """Summed cross-entropy of `hidden` (N, C) through `weight` (V, C) against `targets` (N,),
    chunk by chunk, with the gradients of that sum w.r.t. hidden and weight when asked
    (else None). Returns (loss (), grad_hidden (N, C) | None, grad_weight (V, C) | None); with
    `per_position`, the loss is each position's cross-entropy (N,) instead of their sum (row j of
    grad_hidden is then the gradient of position j's own loss, which only h_j affects).

    Logits are vocab-major, (V, n) per chunk: on a CPU weight @ h.T runs at ~1.5-2x the speed
    of h @ weight.T for these shapes (136 vs 75 GFLOP/s for 128 rows of Gemma's head)."""
    rows = _chunk_rows(weight.shape[0])
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None  # (V, C), made by the first chunk's product: no separate zero fill of V x C
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    positions = torch.empty(hidden.shape[0], dtype=hidden.dtype, device=hidden.device) if per_position else None
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        columns = torch.arange(t.shape[0], device=h.device)
        logits = torch.mm(weight, h.T)  # (V, n)
        target_logits = logits[t, columns]  # (n,)
        top = logits.amax(dim=0)  # (n,)
        exp_logits = logits.sub_(top).exp_()  # in place: no second (V, n) tensor
        norms = exp_logits.sum(dim=0)  # (n,)
        losses = top + norms.log() - target_logits  # (n,)
        total += losses.sum(dtype=torch.float64)
        if per_position:
            positions[start : start + rows] = losses
        if need_hidden or need_weight:
            probabilities = exp_logits.div_(norms)  # (V, n) softmax, in place
            probabilities[t, columns] -= 1.0  # d(sum CE)/d(logits)
            if need_hidden:  # (C, V) @ (V, n) -> (C, n), the fast layout again
                grad_hidden[start : start + rows] = (weight.T @ probabilities).T
            if need_weight:  # (V, n) @ (n, C)
                grad_weight = probabilities @ h if grad_weight is None else grad_weight.addmm_(probabilities, h)
    if need_weight and grad_weight is None:  # no rows at all
        grad_weight = torch.zeros_like(weight)
    return (positions if per_position else total.to(hidden.dtype)), grad_hidden, grad_weight


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), never holding more than one chunk of logits.

    The gradient of a summed cross-entropy w.r.t. its logits is softmax - one_hot, known in the
    forward pass; the upstream gradient is a scalar. So each chunk's logits become gradients for
    `hidden` (and `weight`, when it trains) right away and are freed: same FLOPs as logits +
    F.cross_entropy + autograd, but peak memory of one chunk instead of three (N, V) tensors
    (logits, log-probabilities, their gradient: 3 GB for 1,000 positions of Gemma's head)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):  # hidden (N, C), weight (V, C), targets (N,)
        loss, *ctx.grads = _head_loss_and_grads(hidden, weight, targets, need_hidden=ctx.needs_input_grad[0],
                                                need_weight=ctx.needs_input_grad[1])
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        # The gradients are ours alone: scale them in place (no second V x C tensor for the head).
        return (grad_hidden.mul_(grad_output) if grad_hidden is not None else None,
                grad_weight.mul_(grad_output) if grad_weight is not None else None, None)


class _RowLogprobSums(torch.autograd.Function):
    """Per-sequence sums of log p(target) through the head, in one chunked pass over all positions:
    (N, C) hidden states of `n_rows` sequences -> (n_rows,).

    Each position's gradient w.r.t. its hidden state is made in the forward pass and scaled in
    backward by the upstream gradient of its sequence (DPO weighs every sequence differently).
    The head's own gradient sums over positions of different sequences, so when the head trains it
    is made in backward, once the per-sequence weights are known (one more pass over the head)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, n_rows):
        losses, ctx.grad, _ = _head_loss_and_grads(hidden, weight, targets, need_hidden=ctx.needs_input_grad[0],
                                                   need_weight=False, per_position=True)
        ctx.save_for_backward(hidden, weight, targets, rows)
        sums = torch.zeros(n_rows, dtype=torch.float64, device=hidden.device).index_add_(0, rows, -losses.double())
        return sums.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # grad_output (n_rows,)
        hidden, weight, targets, rows = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        scale = -grad_output[rows]  # (N,): d logp = -d CE, times the sequence's upstream gradient
        grad_hidden = grad.mul_(scale[:, None]) if grad is not None else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            step = _chunk_rows(weight.shape[0])
            for start in range(0, hidden.shape[0], step):
                h, t = hidden[start : start + step], targets[start : start + step]
                probabilities = torch.mm(weight, h.T).softmax(dim=0)  # (V, n)
                probabilities[t, torch.arange(t.shape[0], device=h.device)] -= 1.0
                probabilities.mul_(scale[start : start + step])
                grad_weight = probabilities @ h if grad_weight is None else grad_weight.addmm_(probabilities, h)
        return grad_hidden, grad_weight, None, None, None


def sequence_logprob_sums(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                          n_rows: int) -> torch.Tensor:
    """sum of log p(targets) per sequence: hidden (N, C) at supervised positions, targets (N,),
    rows (N,) the sequence of each position -> (n_rows,). The same arithmetic with or without
    gradients, so a policy and its frozen copy give identical log-probs."""
    _check_targets(weight, targets)
    return _RowLogprobSums.apply(hidden, weight, targets, rows, n_rows)


def _check_targets(weight: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        # A stray IGNORE_INDEX (-100) would index logits from the end instead of failing.
        raise ValueError(f"targets must be token ids in [0, {weight.shape[0]}), got "
                         f"{int(targets.min())}..{int(targets.max())}; select the supervised positions first")


def fused_head_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the linear head `weight` (V, C) on `hidden` (N, C) against
    `targets` (N,), all supervised. Chunked; under no_grad nothing but the loss is computed."""
    _check_targets(weight, targets)
    # The head's logits are always fp32, also under bf16 autocast (a 262,144-way softmax in bf16
    # loses the small probabilities that the loss and its gradient are made of).
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        hidden = hidden.float()
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _FusedHeadCrossEntropy.apply(hidden, weight, targets)
        return _head_loss_and_grads(hidden, weight, targets, need_hidden=False, need_weight=False)[0]
