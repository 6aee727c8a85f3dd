"""Training configuration: typed, validated dataclasses, saved with every run.

`TrainingConfig` holds what every training command shares (the loop's schedule, batches,
evaluation cadence, checkpoints, what trains, where it runs, how it logs); `TrainConfig`
(finetune) and `DPOConfig` (dpo) extend it with their own fields and defaults. Every field carries
its help text as `metadata["help"]`, so a command line can be made from the fields.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from instructkit.errors import UserError

BATCHING = ("grouped", "chapter")
SCHEDULES = ("constant", "cosine")
LOGGERS = ("tensorboard", "wandb", "mlflow")
LOSSES = ("sigmoid", "ipo", "robust")
REDUCTIONS = ("mean", "sum")


def option(default=MISSING, help: str = "", *, factory=MISSING, off_flag: str | None = None):
    """A config field with its help text (the command line's, shown with the field's default).
    `off_flag`: a bool field's short flag for False, besides --no-NAME (kept from earlier releases)."""
    metadata = {"help": help} | ({"off_flag": off_flag} if off_flag else {})
    return field(default=default, default_factory=factory, metadata=metadata)


def config_differences(saved, requested) -> list[str]:
    """Settings in which `requested` differs from a saved config (dataclasses of one kind), as
    "name: saved -> requested". Ignored: where the run lives, how fast it goes and where it logs
    (out, threads, save_every, device, log, memory_limit, checkpoint_activations: recomputing gives the same
    values); a prompt style left unset takes the saved one."""
    ignored = {"out", "threads", "save_every", "device", "log", "memory_limit", "checkpoint_activations"}
    if getattr(requested, "prompt_style", None) is None:
        ignored.add("prompt_style")
    return [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(requested, f.name)!r}"
            for f in fields(saved) if f.name not in ignored and getattr(saved, f.name) != getattr(requested, f.name)]


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def log_names(log: str | None) -> list[str]:
    """The metrics loggers a `--log` value names (comma list), besides metrics.jsonl."""
    return [name.strip() for name in (log or "").split(",") if name.strip() and name.strip() != "jsonl"]


@dataclass
class TrainingConfig:
    """What every training command shares (the chapter's defaults)."""

    data: str = option("chapter7", "training data: JSON/JSONL file, URL, or a named source")
    out: str = option("runs/train", "run folder to create")
    epochs: int = option(2, "passes over the training split")
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    batch_size: int = option(8, "examples per micro-batch (per process)")
    grad_accum: int = option(1, "micro-batches per optimizer step; batch B with accumulation A puts the same "
                                "examples into each step as batch B*A")
    lr: float = option(5e-5, "peak learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices")
    warmup: int = option(0, "linear warm-up steps")
    schedule: str = option("constant", "learning-rate schedule after the warm-up: constant or cosine")
    clip: float | None = option(None, "clip the gradient norm to this value")
    eval_every: int = option(5, "optimizer steps between evaluations")
    eval_batches: int = option(5, "train and validation batches per evaluation")
    early_stop: int | None = option(None, "stop after N evaluations without a better validation loss")
    seed: int = option(123, "seed of initialisation, data order and LoRA's matrices")
    prompt_style: str | None = option(None, "model (its own chat template), alpaca, phi3, gemma, chatml or llama3 (default: "
                                            "the starting run's, else the model's own template, else its family's style)")
    max_length: int | None = option(None, "truncate examples to N training positions")
    skip_invalid: bool = option(False, "drop invalid records instead of stopping")
    batching: str = option("grouped", "grouped (length-grouped batches, little padding) or chapter (shuffled order)")
    lora_rank: int = option(0, "LoRA rank; 0 = full fine-tuning")
    lora_alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha/rank (the book's exercise 7.4 "
                                     "scales by alpha alone: its alpha a at rank r is our a*r)")
    lora_targets: list[str] = option(help="LoRA's layers: attention, mlp, or layer names",
                                     factory=lambda: ["attention", "mlp"])
    base_quantize: str = option("none", "with LoRA: hold the frozen base weights in int8 (one scale a row, "
                                        "products in integers) or int4 (groups of 32); the adapters, the embedding "
                                        "and the head stay fp32; CPU only; or none")
    freeze_embedding: bool = option(False, "freeze the token embedding and the LM head (one tensor where they are tied)")
    checkpoint_activations: bool = option(False, "keep only each layer's input for the backward pass and recompute the "
                                                 "rest there: less memory, about a third more compute")
    save_every: int = option(50, "optimizer steps between resumable checkpoints (also at each epoch end)")
    threads: int | None = option(None, "torch CPU threads")
    memory_limit: float | None = option(None, "GB this run may use at its peak; a run expected to need more (or more than "
                                              "is available, by default) is refused before it starts")
    device: str = option("auto", "auto (CUDA when available), cpu or cuda")
    precision: str = option("fp32", "fp32 or bf16 (autocast; CUDA only)")
    strategy: str = option("ddp", "with --nproc / torchrun: ddp (replicated weights) or fsdp (sharded, FSDP2)")
    log: str | None = option(None, "metrics loggers besides metrics.jsonl (comma list): tensorboard (event files in "
                                   "the run folder), wandb, mlflow (when installed)")

    def validate(self):
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "max_length", "early_stop", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{_flag(name)} must be positive, got {value}")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise UserError(f"--memory-limit must be positive, got {self.memory_limit}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.warmup < 0 or self.lora_rank < 0:
            raise UserError("--weight-decay, --warmup and --lora-rank cannot be negative")
        if self.clip is not None and self.clip <= 0:
            raise UserError(f"--clip must be positive, got {self.clip}")
        for name, allowed in (("schedule", SCHEDULES), ("precision", ("fp32", "bf16")), ("strategy", ("ddp", "fsdp")),
                              ("batching", BATCHING), ("base_quantize", ("none", "int8", "int4"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.base_quantize != "none" and not self.lora_rank:
            raise UserError(f"--base-quantize {self.base_quantize} needs LoRA (--lora-rank N): trained weights stay fp32")
        if self.base_quantize != "none" and (self.device == "cuda" or self.strategy == "fsdp"):
            raise UserError(f"--base-quantize {self.base_quantize} runs on the CPU kernels, without FSDP; use --base-quantize none")
        unknown = [name for name in log_names(self.log) if name not in LOGGERS]
        if unknown:
            raise UserError(f"--log must name some of jsonl, {', '.join(LOGGERS)}, got {unknown[0]!r}")
        return self

    def differences(self, requested) -> list[str]:
        return config_differences(self, requested)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig(TrainingConfig):
    """`instructkit finetune`: supervised fine-tuning (full or LoRA)."""

    model: str = option("gemma-3-270m", "preset, folder, .gguf, .pth or HF repo id")
    out: str = option("runs/finetune", "run folder to create")
    mask_instructions: bool = option(False, "supervise only the response and end token")
    format: str = option("auto", "the data's format: alpaca, messages (OpenAI), sharegpt, or auto (from the first record)")
    columns: str | None = option(None, "other field names of a conversation file: messages=NAME,role=NAME,content=NAME")
    train_on: str | None = option(None, "assistant (every answer and its end token) or all (every token); default: "
                                        "assistant for conversations and a model's own template, else --mask-instructions")
    shuffle_seed: int | None = option(None, "shuffle records before splitting")
    group_near_duplicates: bool = option(False, "keep near-duplicate prompts on one side of the split")
    packing: bool = option(False, "pack each micro-batch's examples end to end into fewer rows (attention and positions "
                                  "stay inside each example): less padding, the same loss")
    pack_length: int | None = option(None, "with --packing, the longest packed row (default: the micro-batch's longest "
                                           "example)")
    sample_prompt: bool = option(True, "a greedy sample for a fixed validation prompt after each epoch",
                                 off_flag="--no-sample")
    data_sha256: str | None = option(None, "the sha256 of the validated records (set by finetune): a resumed run "
                                           "must read the same data")

    def validate(self) -> "TrainConfig":
        if self.pack_length is not None and self.pack_length <= 0:
            raise UserError(f"--pack-length must be positive, got {self.pack_length}")
        if self.pack_length is not None and not self.packing:
            raise UserError("--pack-length needs --packing")
        return super().validate()

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown training option(s) in saved config: {', '.join(unknown)}")
        return cls(**values)


@dataclass
class DPOConfig(TrainingConfig):
    """`instructkit dpo`: Direct Preference Optimization (the book's defaults)."""

    method: str = option("dpo", "tells a DPO run folder from a finetune one")
    start: str = option("", "the starting model: a finished fine-tuning run folder or a model spec")
    data: str = option("", "preference records: instruction, input, chosen, rejected")
    out: str = option("runs/dpo", "run folder to create")
    lr: float = option(5e-6, "peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay on matrices")
    epochs: int = option(1, "passes over the training pairs")
    batch_size: int = option(8, "preference pairs per micro-batch (per process)")
    beta: float = option(0.1, "DPO's beta")
    logp_reduction: str = option("mean", "mean (the book's, length-normalised) or sum (TRL's) of token log-probs")
    loss: str = option("sigmoid", "sigmoid (DPO), ipo or robust")
    label_smoothing: float = option(0.0, "for sigmoid (conservative DPO) and robust")
    sft_weight: float = option(0.0, "weight of an SFT term on the chosen response")
    append_eos: bool = option(True, "append the end token to each response (the book does not)")
    precompute_ref: bool = option(False, "compute the reference log-probs once (eval mode) instead of keeping a "
                                         "second model")

    def validate(self) -> "DPOConfig":
        if self.beta <= 0 or self.lr <= 0:
            raise UserError(f"--beta and --lr must be positive, got {self.beta} and {self.lr}")
        super().validate()
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise UserError(f"--sft-weight cannot be negative, got {self.sft_weight}")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.logp_reduction not in REDUCTIONS:
            raise UserError(f"--logp-reduction must be mean or sum, got {self.logp_reduction!r}")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "DPOConfig":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown or values.get("method") != "dpo":
            raise UserError("not a DPO run folder (its config is not a DPO config); use `instructkit finetune --resume`")
        return cls(**values)
