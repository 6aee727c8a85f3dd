"""What every training command does around the one loop (train/fit.py), written once: take up an
existing run folder (refuse, resume or say it is finished), make the model trainable (LoRA, a
frozen embedding) and its session (device, DDP/FSDP wrapper, optimizer), start or resume the
loop's state, and write the trained model into the run folder.
"""

from __future__ import annotations

import torch

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError
from instructkit.fileio import atomic_write_with
from instructkit.models.registry import save_model_folder
from instructkit.runs import RunFolder
from instructkit.train import distributed
from instructkit.train.checkpoint import find_checkpoint, load_checkpoint
from instructkit.train.config import TrainingConfig, log_names
from instructkit.train.distributed import World
from instructkit.train.fit import Session, build_optimizer, fit, start_state
from instructkit.train.loggers import PACKAGES, open_loggers
from instructkit.train.lora import apply_lora, lora_state_dict, merged_state
from instructkit.train.quantized_base import quantize_base


def check_existing(run: RunFolder, requested: TrainingConfig, resume: bool, load_saved) -> None:
    """Refuse to write into a run folder that holds a run, unless resuming the same request
    (`load_saved()`: the saved config); refuse a logger that is not installed, before anything
    is written."""
    import importlib.util

    for name in log_names(requested.log):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"--log {name}: the {PACKAGES[name]} package is not installed (pip install {PACKAGES[name]})")
    if run.holds_hf_model():
        raise UserError(f"{run}: holds a Hugging Face model (its config.json); choose another --out")
    if not run.has_config():
        return
    if not resume:
        raise UserError(f"{run}: already holds a run; pass --resume {run} to continue it, or choose another --out")
    differences = load_saved().differences(requested)
    if differences:
        raise UserError(f"{run}: holds a run with other settings ({'; '.join(differences)}); "
                        f"choose another --out, or remove {run} to start over")


def make_trainable(model: torch.nn.Module, config: TrainingConfig) -> int:
    """LoRA adapters (their A matrices drawn from the run's seed), a frozen tied embedding and
    checkpointed activations, as the config asks; returns how many layers got adapters."""
    model.checkpoint_layers = config.checkpoint_activations
    wrapped = 0
    if config.lora_rank:
        wrapped = apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, seed=config.seed)
        quantize_base(model, config.base_quantize)
    if config.freeze_embedding:
        model.tie_weights()  # the head's weight is the embedding: freezing it freezes both
        model.lm_head.weight.requires_grad_(False)
        if not getattr(model.config, "tie_embeddings", True):  # an untied head (Llama, Phi-3, OLMo 2): the
            model.model.embed_tokens.weight.requires_grad_(False)  # token embedding is a tensor of its own
    return wrapped


def check_memory(model: torch.nn.Module, config: TrainingConfig, longest: int, world: World, device: torch.device,
                 tell, *, sequences_per_example: int = 1) -> None:
    """Print the run's expected peak memory and refuse, before anything is written, a run that
    cannot fit (train/memory.py); `longest`: the longest training sequence, in tokens."""
    import os

    from instructkit.train.loss import _chunk_rows
    from instructkit.train.memory import check_fits, plan_memory

    if device.type != "cpu":
        return
    rows = config.batch_size * sequences_per_example
    tokens = rows * longest  # a batch is padded to its longest
    if getattr(config, "packing", False) and config.pack_length and config.pack_length > longest:
        # Packed rows of up to pack_length: first-fit decreasing fills every row but one more than
        # half, so at most 2 x (the tokens) / pack_length rows (never more rows than examples).
        tokens = min(rows, 2 * -(-tokens // config.pack_length)) * config.pack_length
    plan = plan_memory(model, micro_batch_tokens=tokens, head_chunk_rows=_chunk_rows(model.config.vocab_size),
                       checkpointed=config.checkpoint_activations)
    tell(f"Memory: {plan.describe()}")
    check_fits(plan, limit_gb=config.memory_limit, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
               where=str(config.out))


def make_session(model: torch.nn.Module, config: TrainingConfig, world: World, device: torch.device) -> Session:
    """The model on its device, wrapped for its ranks, with its optimizer."""
    trained = distributed.wrap(model, world, device, config.strategy)
    optimizer = build_optimizer(trained, config, fused=config.strategy != "fsdp")
    return Session(model, trained, optimizer, world, device, config.precision)


def start_or_resume(session: Session, run: RunFolder, config: TrainingConfig, style: PromptStyle, say) -> dict:
    """The loop's state: the run's checkpoint's, or a fresh one (the run folder then started,
    its config and prompt style written)."""
    world = session.world
    checkpoint = find_checkpoint(run) if run.has_config() else None
    if run.has_config() and checkpoint is None:
        say(f"{run}: no checkpoint yet (the run stopped before its first save); starting it afresh")
    state = start_state()
    if checkpoint is not None:
        state.update(load_checkpoint(checkpoint, **session.checkpoint_parts()))
        distributed.check_world(state.get("world_size", 1), world)
        say(f"Resuming {run} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']})")
    else:
        if world.is_main:
            run.remove_checkpoints()
            run.write_start(config.to_dict(), style)
        state["world_size"] = world.size
    distributed.barrier(world)
    return state


def fit_and_write(session: Session, objective, config: TrainingConfig, run: RunFolder, state: dict, write) -> None:
    """The loop with the config's loggers (rank 0's), then `write(model)` on rank 0 with the
    trained model whole (see plain_copy)."""
    loggers = open_loggers(config.log, run, config.to_dict(), state, main=session.world.is_main)
    try:
        fit(session, objective, config, run, state, loggers)
        trained = plain_copy(session, config)  # every rank takes part in gathering a sharded model
        if session.world.is_main:
            write(trained)
    finally:
        loggers.close()
    distributed.barrier(session.world)


def plain_copy(session: Session, config: TrainingConfig) -> torch.nn.Module | None:
    """The trained model whole, on rank 0: a sharded (FSDP) one gathered from every rank into a
    plain copy (every rank must call); the model itself otherwise. None on the other ranks."""
    full = distributed.full_state(session.trained, session.world)
    if not session.world.is_main:
        return None
    if full is None:
        return session.model
    from instructkit.models.checkpoints import skip_weight_init
    from instructkit.models.registry import build_model

    with skip_weight_init():
        model = build_model(session.model.config)
    if config.lora_rank:
        apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, seed=config.seed)
    model.load_state_dict(full)
    return model


def save_trained(model: torch.nn.Module, config: TrainingConfig, run: RunFolder, tokenizer_ref) -> None:
    """The model folder in the run folder: LoRA's tensors alone, then merged into plain weights."""
    from safetensors.torch import save_file

    model = model.cpu()
    model.tie_weights()
    tensors = None
    if config.lora_rank:
        adapters = lora_state_dict(model)
        atomic_write_with(run.adapter_file, lambda tmp: save_file(adapters, str(tmp)))  # unique temp, fsynced
        tensors = merged_state(model)  # into the dequantized base where --base-quantize held it quantized
    save_model_folder(run.path, model, tokenizer_ref, tensors)
