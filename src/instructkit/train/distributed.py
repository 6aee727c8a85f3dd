"""Data-parallel fine-tuning on PyTorch's own stack: torchrun starts the processes, DDP (or FSDP2's
`fully_shard`) keeps their weights in step, gloo carries the collectives on CPUs and nccl on GPUs.

What "exact" means here (each point tested against one process on this 2-core CPU):
  - one global data order, sliced per rank: micro-batch k of a step holds batch x world examples,
    rank r takes its r-th slice, so N processes see the batches one process with N times the batch
    would see;
  - the loss of a step is the sum of token losses over every rank and micro-batch divided by the
    number of supervised tokens of all of them (one all-reduce of the count per step), not a mean
    of per-rank means; gradients are clipped after the all-reduce;
  - evaluation shards the examples so each is counted exactly once (no padding duplicates) and
    all-reduces the sums; a sample is generated on rank 0 from the unwrapped model, outside any
    collective;
  - rank 0 alone writes checkpoints (atomically), with the world size and every rank's RNG state;
    a resume with another world size is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from instructkit.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


RELAUNCH_ARGV = "INSTRUCTKIT_RELAUNCH_ARGV"


def relaunch(nproc: int, args: list[str]) -> int:
    """Run `instructkit ARGS` again under torchrun (one node, `nproc` processes); its exit code.
    The arguments travel in the environment: torchrun's own parser would claim any option that
    abbreviates one of its own (`dpo --run` reads as its `--run-path`)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "-m", "instructkit"]
    env = {**os.environ, "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"), RELAUNCH_ARGV: json.dumps(args),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    return subprocess.run(command, env=env).returncode


def relaunched_argv() -> list[str] | None:
    """The arguments `relaunch` handed to this torchrun worker; None otherwise."""
    if RELAUNCH_ARGV in os.environ and launched_by_torchrun():
        return json.loads(os.environ[RELAUNCH_ARGV])
    return None


def init(device: torch.device, timeout_s: float | None = None) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a single process
    otherwise."""
    if not launched_by_torchrun():
        return SINGLE
    _die_with_parent()
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("INSTRUCTKIT_DIST_TIMEOUT", 600)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    return world


def _die_with_parent() -> None:
    """torchrun starts each worker in a session of its own, so killing the launcher (kill -9, an
    OOM kill) would leave the workers training on, and writing checkpoints, unseen. On Linux a
    worker asks to be killed with its parent, the torchrun agent."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def finish(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float | int, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_reduce_max(value: float | int, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def shard(indices: list[int], world: World) -> list[int]:
    """This rank's share of a list, each item on exactly one rank (no padding duplicates)."""
    return indices[world.rank :: world.size]


def rng_states(world: World, device: torch.device) -> list:
    """Every rank's torch RNG state, gathered on all ranks (rank 0 saves them)."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state()
    if not world.distributed:
        return [mine]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, mine)
    return gathered


def wrap(model: torch.nn.Module, world: World, device: torch.device, strategy: str = "ddp") -> torch.nn.Module:
    """The model as its ranks train it: DDP (replicated weights, gradients all-reduced) or FSDP2
    (weights sharded per layer); the unwrapped model stays `model`."""
    if not world.distributed:
        return model
    if strategy == "fsdp":
        fully_shard = _fsdp2().fully_shard
        for layer in _layers(model):
            fully_shard(layer)
        # The root (embedding, tied head, final norm) stays gathered after its forward: the fused
        # head uses the weight outside the forward pass.
        fully_shard(model, reshard_after_forward=False)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # DDP would expect a sparse gradient from a sparse embedding; the tied embedding's gradient is
    # the head's dense one plus the lookup's rows, so the lookup gives a dense gradient here.
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.sparse = False
    return DistributedDataParallel(model, device_ids=[world.local_rank] if device.type == "cuda" else None)


def _layers(model) -> list[torch.nn.Module]:
    body = getattr(model, "model", None) or getattr(model, "transformer")
    return list(getattr(body, "layers", None) or getattr(body, "h"))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def check_world(saved_world: int, world: World) -> None:
    if saved_world != world.size:
        raise UserError(f"the checkpoint was written by {saved_world} process(es); resume it with --nproc {saved_world} "
                        f"(this run has {world.size}), since the data order and RNG states are per process")


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def is_sharded(model: torch.nn.Module) -> bool:
    """An FSDP2 model (fully_shard makes its class an FSDPModule)."""
    if not dist.is_available():
        return False
    return isinstance(model, _fsdp2().FSDPModule)


def _fsdp2():
    """FSDP2's module: public in torch.distributed.fsdp since torch 2.6, under _composable before."""
    try:
        from torch.distributed import fsdp

        fsdp.FSDPModule  # noqa: B018 (present since 2.6)
        return fsdp
    except (ImportError, AttributeError):
        from torch.distributed._composable import fsdp

        return fsdp


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_state(model: torch.nn.Module, world: World) -> dict | None:
    """The whole weights of a sharded model, gathered on rank 0 (every rank must call); None for a
    model that is not sharded (its plain weights are already whole)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def gather_training_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Whole weights and optimizer state of a sharded model, on rank 0 (every rank must call)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model, options=_options()), get_optimizer_state_dict(model, optimizer, options=_options())


def restore_training_state(model: torch.nn.Module, optimizer, weights: dict, optimizer_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())
