"""The one loss function: mean cross-entropy over supervised targets.

Targets come from the collate function, already shifted by one, with IGNORE_INDEX wherever no
loss counts. Averaging is over supervised targets only, so padding never dilutes the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from instructkit.data.tokenize import IGNORE_INDEX


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """logits (..., V), targets (...) with IGNORE_INDEX for masked positions."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
