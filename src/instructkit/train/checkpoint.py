"""Resumable training state, written atomically.

A checkpoint is a folder in the run folder (RunFolder.checkpoint_dir) holding the trainable
tensors (`trainable.safetensors`), the optimizer state and every rank's RNG states
(`optimizer.pt`, read back with `torch.load(weights_only=True)`: plain tensors and numbers, no
pickled code) and `state.json` (step, position in the data order, world size, metrics). It is
written to a staging folder, then swapped in by renames, so a kill at any moment leaves the last
complete checkpoint in place (either the current folder or, between the two renames, the
previous one). Across processes, rank 0 writes it; a sharded (FSDP) model and its optimizer are
first gathered whole, by every rank.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from instructkit.runs import RunFolder
from instructkit.train import distributed
from instructkit.train.distributed import SINGLE, World


def save_checkpoint(run: RunFolder, state: dict, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    world: World = SINGLE, device: torch.device | None = None, trained: torch.nn.Module | None = None) -> None:
    from safetensors.torch import save_file

    device = device or torch.device("cpu")
    rng = distributed.rng_states(world, device)  # every rank takes part
    sharded = trained is not None and distributed.is_sharded(trained)
    if sharded:
        params, optimizer_state = distributed.gather_training_state(trained, optimizer)
    if not world.is_main:
        distributed.barrier(world)
        return
    if not sharded:
        params = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
        optimizer_state = optimizer.state_dict()
    trainable_names = {name for name, p in model.named_parameters() if p.requires_grad}
    final, staging, old = run.checkpoint_dirs()
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in params.items() if n in trainable_names}, str(staging / "trainable.safetensors"))
    torch.save({"optimizer": optimizer_state, "torch_rng": rng[0]["cpu"], "rank_rng": rng}, staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    for file in staging.iterdir():  # make the bytes durable before the renames publish them
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(world)


def find_checkpoint(run: RunFolder) -> Path | None:
    final, _, old = run.checkpoint_dirs()
    for folder in (final, old):
        if (folder / "state.json").exists():
            return folder
    return None


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World = SINGLE,
                    device: torch.device | None = None, trained: torch.nn.Module | None = None) -> dict:
    from safetensors.torch import load_file

    trainable = load_file(str(folder / "trainable.safetensors"))
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    if trained is not None and distributed.is_sharded(trained):
        distributed.restore_training_state(trained, optimizer, trainable, saved["optimizer"])
    else:
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in trainable.items():
                parameters[name].copy_(tensor)
        optimizer.load_state_dict(saved["optimizer"])
    states = saved.get("rank_rng") or [{"cpu": saved["torch_rng"]}]
    mine = states[world.rank] if world.rank < len(states) else states[0]
    torch.set_rng_state(mine["cpu"])
    if "cuda" in mine and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"])
    return json.loads((folder / "state.json").read_text())
