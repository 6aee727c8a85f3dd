"""LoRA (the chapter's exercise 7.4): low-rank adapters beside frozen linear layers.

    y = x W^T + b + (alpha / r) * (x A^T) B^T        A: (r, in), B: (out, r), B starts at zero

The scale is alpha / rank, the common convention (the LoRA paper, PEFT, litgpt). The book's
exercise 7.4 multiplies by alpha alone: its alpha a at rank r equals our alpha a * r.
A is drawn from a generator seeded by the run's seed, so a rerun makes the same adapters.

Adapters are merged into plain weights for saving (`merged_state`, one layer at a time), so a
fine-tuned model loads like any other; the adapter tensors alone are also kept (`lora_state_dict`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from instructkit.models.checkpoints import LazyTensor
from instructkit.train.quantized_base import FrozenBaseLinear



class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear | FrozenBaseLinear, rank: int, alpha: float, generator: torch.Generator | None = None):
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

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def plain_weight(self) -> torch.Tensor:
        """W + s B A in fp32 (out, in), a fresh tensor: W the base's values, dequantized where
        --base-quantize holds them quantized (train/quantized_base.py), the weights the adapters
        were trained against, so the merged layer computes what the trained one did."""
        with torch.no_grad():
            if isinstance(self.base, nn.Linear):
                weight = self.base.weight.detach().float().clone()
            else:
                weight = self.base.plain_weight()
            return weight.addmm_(self.lora_B, self.lora_A, alpha=self.scaling)

    def plain_bias(self) -> torch.Tensor | None:
        return self.base.bias if isinstance(self.base, nn.Linear) else self.base.plain_bias()


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
        if isinstance(module, (nn.Linear, FrozenBaseLinear)) and name.endswith(suffixes):  # the latter:
            # loaded quantized for an int8 / int4 base (quantized_base.frozen_linears)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha, generator))
            wrapped += 1
    return wrapped


def merged_state(model: nn.Module) -> dict[str, torch.Tensor | LazyTensor]:
    """The state of the plain model the adapters merge into, under its own names (no `base.` or
    `lora_`): each adapted layer's weight W + s B A, and a frozen quantized layer's dequantized
    one, as a LazyTensor made only when written (registry.save_model_folder), so saving holds one
    layer's fp32 weights beside the model at a time, never a second copy of it (a 1.5B model on
    an int8 base would otherwise grow by its 6.2 GB of fp32 weights at the end of the run)."""
    layers: dict[str, nn.Module] = {}  # the outermost module of each layer that has plain_weight

    def inside_one(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:end]) in layers for end in range(1, len(parts)))

    for name, module in model.named_modules():
        if hasattr(module, "plain_weight") and not inside_one(name):
            layers[name] = module
    state = {name: tensor for name, tensor in model.state_dict().items() if not inside_one(name)}
    for name, layer in layers.items():
        state[f"{name}.weight"] = LazyTensor((layer.out_features, layer.in_features), torch.float32, layer.plain_weight)
        if (bias := layer.plain_bias()) is not None:
            state[f"{name}.bias"] = bias.detach().float()
    return state


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
