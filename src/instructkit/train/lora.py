"""LoRA (the chapter's exercise 7.4): low-rank adapters beside frozen linear layers.

    y = x W^T + b + (alpha / r) * (x A^T) B^T        A: (r, in), B: (out, r), B starts at zero

The scale is alpha / rank, the common convention (the LoRA paper, PEFT, litgpt). The book's
exercise 7.4 multiplies by alpha alone: its alpha a at rank r equals our alpha a * r.
A is drawn from a generator seeded by the run's seed, so a rerun makes the same adapters.

Adapters are merged into plain weights for saving (`merge_lora`), so a fine-tuned model loads
like any other; the adapter tensors alone are also kept (`lora_state_dict`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn



class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """The base with the update added; a quantized base (train/quantized_base.py) becomes the
        fp32 layer its values stand for first."""
        base = self.base if isinstance(self.base, nn.Linear) else self.base.to_linear()
        with torch.no_grad():
            base.weight += (self.lora_B @ self.lora_A) * self.scaling
        return base


def target_suffixes(family: str, targets: list[str]) -> tuple[str, ...]:
    from instructkit.errors import UserError

    from instructkit.models.families import family_of

    groups = family_of(family).lora_targets
    suffixes: list[str] = []
    for target in targets:
        if target in groups:
            suffixes.extend(groups[target])
        elif any(target in names for names in groups.values()):
            suffixes.append(target)
        else:
            known = sorted(set(groups) | {name for names in groups.values() for name in names})
            raise UserError(f"unknown --lora-targets entry {target!r} for {family} (choose from: {', '.join(known)})")
    return tuple(suffixes)


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, *, seed: int = 0) -> int:
    """Freeze the model and wrap the targeted linear layers, their A matrices drawn in module order
    from a generator seeded with `seed`. Returns how many were wrapped."""
    generator = torch.Generator().manual_seed(seed)
    suffixes = target_suffixes(model.config.family, targets)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(suffixes):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha, generator))
            wrapped += 1
    return wrapped


def merge_lora(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
