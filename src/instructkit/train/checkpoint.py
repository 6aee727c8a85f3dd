"""Resumable training state, written atomically.

A checkpoint is a folder in the run folder (RunFolder.checkpoint_dir) holding the trainable
tensors (`trainable.safetensors`), the optimizer and RNG states (`optimizer.pt`, read back with
`torch.load(weights_only=True)`: plain tensors and numbers, no pickled code) and `state.json`
(step, position in the data order, metrics). It is written to a staging folder, then swapped in
by renames, so a kill at any moment leaves the last complete checkpoint in place (either the
current folder or, between the two renames, the previous one).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from instructkit.runs import RunFolder


def save_checkpoint(run: RunFolder, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    final, staging, old = run.checkpoint_dirs()
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(staging / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    for file in staging.iterdir():  # make the bytes durable before the renames publish them
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run: RunFolder) -> Path | None:
    final, _, old = run.checkpoint_dirs()
    for folder in (final, old):
        if (folder / "state.json").exists():
            return folder
    return None


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    trainable = load_file(str(folder / "trainable.safetensors"))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in trainable.items():
            parameters[name].copy_(tensor)
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    return json.loads((folder / "state.json").read_text())
