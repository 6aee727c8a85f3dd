"""Where a command computes, and in which precision.

`--device auto` is CUDA when this torch sees a GPU, else the CPU. bf16 is for CUDA only: on the
CPUs we measure, bf16 matmuls fall back to a scalar path ~300x slower than fp32, so it is refused
there rather than made silently slow. Training uses bf16 as autocast (fp32 weights and optimizer
state); inference casts the weights (the KV cache follows their dtype).
"""

from __future__ import annotations

import torch

from instructkit.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str, precision: str = "fp32") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this torch; use --device cpu (or auto)")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and name != "cuda":
        raise UserError("--precision bf16 runs on CUDA only: bf16 matmuls on this CPU are ~300x slower than fp32")
    return torch.device(name)


def place_for_inference(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """The model on `device`, its weights cast to bf16 when asked (inference only)."""
    model.to(device)
    if precision == "bf16":
        model.to(torch.bfloat16)
    return model
