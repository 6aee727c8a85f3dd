"""The memory a training run will need at its peak, known before it starts.

A run that cannot fit would otherwise be killed by the OS hours in (or swap the machine to a
halt), with nothing saved. After the model is loaded (its weights, and the libraries, are in the
process already: counted from the resident set, once every weight page has been read, since a
memory-mapped checkpoint is paged in lazily), the peak comes at the start of a backward pass:

    AdamW state          8 bytes per trainable parameter (two moments); frozen ones have none
    activations          what autograd keeps per token per layer for the backward pass, times
                         the tokens of the largest micro-batch (batch size x the longest example,
                         as batches are padded to their longest)
    the loss head        one chunk of logits and its gradient (train/loss.py chunks them), and
                         the head's weight gradient when it trains: the fused loss makes it
                         during the forward pass, so it is held through the backward

(the other gradients, 4 bytes per trainable parameter, take the place of activations that the backward
pass frees as it goes, so they do not add to the peak).

Activations per token per layer, in fp32 values (our blocks, eager autograd): the block input and
the normalised inputs of attention and MLP (~6 x emb), queries, keys and values before and after
RoPE plus the attention output and its reshaped copy (2 x (q + 2 kv) + 2 x q), and the MLP's gate,
its activation, up and their product (4 x hidden). SDPA keeps no T x T matrix. Checked against the
measured peak of real runs (tests/test_smollm2.py); the estimate is printed before every run and
a run expected to exceed the memory available (or --memory-limit) is refused in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from instructkit.errors import UserError

GB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    resident: int  # bytes held now: weights, libraries, data
    optimizer: int  # AdamW state of the trainable parameters
    activations: int
    head: int

    @property
    def added(self) -> int:
        return self.optimizer + self.activations + self.head

    @property
    def peak(self) -> int:
        return self.resident + self.added

    def describe(self) -> str:
        return (f"expected peak memory {self.peak / GB:.1f} GB: {self.resident / GB:.1f} GB loaded, "
                f"{self.optimizer / GB:.2f} GB AdamW state, {self.activations / GB:.2f} GB activations, "
                f"{self.head / GB:.2f} GB loss head")


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int | None:
    """Memory the OS can still give (MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def activation_values_per_token(config, *, checkpointed: bool = False) -> int:
    """fp32 values autograd keeps per token, over all layers (see the module docstring); with
    checkpointed layers, each layer's input plus one layer's values, recomputed in its backward."""
    emb, heads, head_dim = config.emb_dim, config.n_heads, config.head_dim
    kv = getattr(config, "n_kv_heads", heads) * head_dim
    q = heads * head_dim
    hidden = getattr(config, "hidden_dim", 4 * emb)  # GPT-2's MLP is 4 x emb
    per_layer = 6 * emb + 2 * (q + 2 * kv) + 2 * q + 4 * hidden
    return config.n_layers * emb + per_layer if checkpointed else config.n_layers * per_layer


def plan_memory(model: torch.nn.Module, *, micro_batch_tokens: int, head_chunk_rows: int,
                checkpointed: bool = False) -> MemoryPlan:
    """The plan for training `model` (LoRA applied, frozen parameters marked) on micro-batches of
    `micro_batch_tokens` padded positions (`checkpointed`: --checkpoint-activations)."""
    unique = list({id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    for parameter in unique:  # page in every weight (one value per 4 KiB page): training will read them all
        if parameter.device.type == "cpu" and parameter.numel():
            parameter.detach().reshape(-1)[:: max(1, 4096 // parameter.element_size())].sum()
    config = model.config
    activations = 4 * activation_values_per_token(config, checkpointed=checkpointed) * micro_batch_tokens
    head = 3 * 4 * min(micro_batch_tokens, head_chunk_rows) * config.vocab_size  # logits, softmax, gradient
    head_weight = getattr(getattr(model, "lm_head", None), "weight", None)
    if head_weight is not None and head_weight.requires_grad:
        head += 4 * head_weight.numel()
    return MemoryPlan(resident=resident_bytes(), optimizer=8 * trainable, activations=activations, head=head)


def check_fits(plan: MemoryPlan, *, limit_gb: float | None, processes: int = 1, where: str = "this run") -> None:
    """Refuse, in one line, a run whose `processes` ranks on this machine need more than is free
    (or more than `limit_gb` at the peak)."""
    if limit_gb is not None:
        budget, what = int(limit_gb * GB) - plan.resident * processes, f"--memory-limit {limit_gb:g} GB"
    else:
        free = available_bytes()
        if free is None:
            return
        budget, what = free, "available"
    need = plan.added * processes
    if need > budget:
        raise UserError(f"{where}: needs about {need / GB:.1f} GB more memory than it holds now "
                        f"({plan.describe()}{f', x {processes} processes' if processes > 1 else ''}), but "
                        f"{max(budget, 0) / GB:.1f} GB is {what}; lower --batch-size or --max-length, or train "
                        "LoRA adapters (--lora-rank 16) instead of every weight")
