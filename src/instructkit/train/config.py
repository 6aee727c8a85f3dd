"""Fine-tuning configuration: one typed, validated dataclass, saved with every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from instructkit.errors import UserError

BATCHING = ("grouped", "chapter")
SCHEDULES = ("constant", "cosine")


def config_differences(saved, requested) -> list[str]:
    """Settings in which `requested` differs from a saved config (dataclasses of one kind), as
    "name: saved -> requested". Ignored: where the run lives and how fast it goes (out, threads,
    save_every); a prompt style left unset takes the saved one."""
    ignored = {"out", "threads", "save_every", "device"}
    if getattr(requested, "prompt_style", None) is None:
        ignored.add("prompt_style")
    return [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(requested, f.name)!r}"
            for f in fields(saved) if f.name not in ignored and getattr(saved, f.name) != getattr(requested, f.name)]


@dataclass
class TrainConfig:
    model: str = "gemma-3-270m"
    data: str = "chapter7"
    out: str = "runs/finetune"
    # The chapter's defaults.
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup: int = 0
    schedule: str = "constant"
    clip: float | None = None
    eval_every: int = 5
    eval_batches: int = 5
    early_stop: int | None = None  # evaluations without a new best validation loss
    seed: int = 123
    # Data.
    prompt_style: str | None = None  # None: the model's default (alpaca for GPT-2, gemma for Gemma)
    mask_instructions: bool = False
    max_length: int | None = None
    skip_invalid: bool = False
    shuffle_seed: int | None = None
    group_near_duplicates: bool = False  # near-duplicate prompts stay on one side of the split
    batching: str = "grouped"  # length-grouped batches (little padding) or the chapter's order
    # What trains.
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    freeze_embedding: bool = False
    # Bookkeeping.
    save_every: int = 50  # optimizer steps between resumable checkpoints (also at each epoch end)
    sample_prompt: bool = True  # greedy sample for a fixed validation prompt after each epoch
    threads: int | None = None
    # Where and how it runs: auto = CUDA when available; bf16 autocast on CUDA only; across
    # processes (torchrun), ddp replicates the weights and fsdp shards them.
    device: str = "auto"
    precision: str = "fp32"
    strategy: str = "ddp"
    # The sha256 of the validated records (set by finetune): a resumed run must read the same data.
    data_sha256: str | None = None

    def validate(self) -> "TrainConfig":
        positive = ["epochs", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "max_length", "early_stop", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.warmup < 0 or self.lora_rank < 0:
            raise UserError("--weight-decay, --warmup and --lora-rank cannot be negative")
        if self.clip is not None and self.clip <= 0:
            raise UserError(f"--clip must be positive, got {self.clip}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise UserError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.batching not in BATCHING:
            raise UserError(f"--batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")
        return self

    def differences(self, requested: "TrainConfig") -> list[str]:
        return config_differences(self, requested)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown training option(s) in saved config: {', '.join(unknown)}")
        return cls(**values)
