"""The run folder: the one owner of its file names, readers and writers.

A fine-tuning run folder describes itself, and every stage takes it (finetune writes it; respond,
evaluate, export, chat and serve read it):

    config.json            the resolved training config (handed up as data: the train package owns its schema)
    recipe.yaml            the same config as a recipe file: `--config recipe.yaml` repeats the run (recipes/)
    prompt_style.json      the prompt style the model was trained with
    model.json, model.safetensors, tokenizer_ref.json [, tokenizer.json]
                           the fine-tuned model (a model folder: models/registry.py reads and writes these;
                           model.json records the weights' sha256, checked on load, and
                           .model.safetensors.verified.json the file it last matched, so loads skip the hashing)
    quantized-MODE.safetensors   low-precision decoding weights, made once (a damaged one is remade)
    adapter.safetensors    the LoRA tensors alone (LoRA runs)
    metrics.jsonl          one row per optimizer step and per evaluation
    samples.jsonl          a greedy sample for a fixed validation prompt after each epoch
    data.json              the data as trained: format, what the loss covers, mask coverage per split
                           (supervised tokens per record, records cut and dropped), the first example marked
    loss-plot.png / .pdf   the chapter's plot
    quality-plot.png / .pdf   validation-response metrics over training (when the run scores them)
    checkpoint/            resume state while the run is unfinished (train/checkpoint.py owns its insides)
    SPLIT-responses.json (+ .jsonl)   responses of the fine-tuned model; base-responses.json of the base model
    evaluation.json, report.md, report.html, judge-cache.jsonl, score-histogram.png   the evaluation

A run is finished when its model is written and no checkpoint is left.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError
from instructkit.fileio import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from instructkit.recipes import RECIPE_FILE, recipe_text

MODEL_FILES = ("model.json", "model.safetensors", "tokenizer_ref.json")


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # Files ---------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def prompt_style_file(self) -> Path:
        return self.path / "prompt_style.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples_file(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def data_file(self) -> Path:
        return self.path / "data.json"

    def data_coverage(self) -> dict | None:
        """data.json's contents, or None for a run from before it existed."""
        if not self.data_file.exists():
            return None
        try:
            return json.loads(self.data_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{self.data_file}: not valid JSON ({exc})") from None

    @property
    def adapter_file(self) -> Path:
        return self.path / "adapter.safetensors"

    @property
    def loss_plot(self) -> Path:
        """The plot's stem: .png and .pdf are written beside each other."""
        return self.path / "loss-plot"

    @property
    def quality_plot(self) -> Path:
        """The loss plot's companion: metrics of generated validation responses over training."""
        return self.path / "quality-plot"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    def checkpoint_dirs(self) -> tuple[Path, Path, Path]:
        """(current, being written, previous): a checkpoint is swapped in by renames."""
        return self.checkpoint_dir, self.path / "checkpoint.tmp", self.path / "checkpoint.old"

    def responses_file(self, split: str = "test", *, base: bool = False) -> Path:
        return self.path / ("base-responses.json" if base else f"{split}-responses.json")

    @property
    def evaluation_file(self) -> Path:
        return self.path / "evaluation.json"

    @property
    def report_files(self) -> tuple[Path, Path]:
        return self.path / "report.md", self.path / "report.html"

    @property
    def ifeval_dir(self) -> Path:
        """`evaluate --benchmark ifeval --run` writes its responses, ifeval.json and report here."""
        return self.path / "ifeval"

    @property
    def judge_cache(self) -> Path:
        return self.path / "judge-cache.jsonl"

    # State ---------------------------------------------------------------------------------
    def has_config(self) -> bool:
        """Whether the folder holds a run: its config.json is the run's settings, not a model's
        (see holds_hf_model)."""
        return self.config_file.exists() and not self.holds_hf_model()

    def holds_hf_model(self) -> bool:
        """A Hugging Face model folder (saved by transformers, or our HF export): its config.json
        is the model's, with a "model_type". It is a model to load, and no place to write a run."""
        try:
            values = json.loads(self.config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False  # none, or a damaged run config: config() says so in one line
        return isinstance(values, dict) and "model_type" in values

    def has_model(self) -> bool:
        return all((self.path / name).exists() for name in MODEL_FILES)

    def has_checkpoint(self) -> bool:
        return any(folder.exists() for folder in self.checkpoint_dirs())

    @property
    def is_finished(self) -> bool:
        return self.has_model() and not self.has_checkpoint()

    def require_finished(self) -> "RunFolder":
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such run folder")
        if not self.has_model():
            raise UserError(f"{self.path}: no fine-tuned model here (model.json missing); is the run finished?")
        if self.has_checkpoint():
            raise UserError(f"{self.path}: the run is unfinished (a checkpoint is left); finish it with "
                            f"`instructkit finetune --resume {self.path}`")
        return self

    # Readers -------------------------------------------------------------------------------
    def config(self) -> dict:
        if not self.config_file.exists():
            raise UserError(f"{self.path}: no config.json, so not a fine-tuning run folder")
        try:
            return json.loads(self.config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.config_file}: not valid JSON ({exc.msg})") from None

    def prompt_style(self) -> PromptStyle | None:
        if not self.prompt_style_file.exists():
            return None
        path = self.prompt_style_file
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); the run folder is damaged") from None
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a JSON object (a prompt style); the run folder is damaged")
        try:
            style = PromptStyle.from_dict(value)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        if problem := _style_problem(style):
            raise UserError(f"{path}: {problem}; the run folder is damaged")
        return style

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    def evals(self) -> list[dict]:
        return [row for row in self.metrics() if row.get("kind") == "eval"]

    def responses(self, split: str = "test", *, base: bool = False) -> list[dict]:
        path = self.responses_file(split, base=base)
        if not path.exists():
            raise UserError(f"{path}: no responses yet; run `instructkit respond --run {self.path} --split {split}`")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); remove it and run `instructkit respond` again") from None

    # Writers -------------------------------------------------------------------------------
    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_start(self, config: dict, style: PromptStyle) -> None:
        """What a run records before its first step: the resolved config (as config.json and as a
        recipe file, the recipe first: a folder with a config has both) and the prompt style."""
        self.create()
        atomic_write_text(self.recipe_file, recipe_text(config))
        atomic_write_json(self.config_file, config)
        atomic_write_json(self.prompt_style_file, style.to_dict())

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_jsonl(self.metrics_file, rows)

    def write_samples(self, rows: list[dict]) -> None:
        atomic_write_jsonl(self.samples_file, rows)

    def remove_checkpoints(self) -> None:
        for folder in self.checkpoint_dirs():
            shutil.rmtree(folder, ignore_errors=True)


def _style_problem(style: PromptStyle) -> str | None:
    """What is wrong with the field types of a prompt style read from a file, or None."""
    for name in ("name", "instruction_prefix", "input_prefix", "response_prefix", "turn_separator", "system_prefix",
                 "system_suffix"):
        if not isinstance(getattr(style, name), str):
            return f"{name!r} must be a string"
    if style.end_marker is not None and not isinstance(style.end_marker, str):
        return "'end_marker' must be a string or null"
    if not isinstance(style.system_in_first_turn, bool):
        return "'system_in_first_turn' must be true or false"
    if not all(isinstance(stop, str) for stop in style.stop_strings):
        return "'stop_strings' must be a list of strings"
    if style.chat_template is not None and not isinstance(style.chat_template, str):
        return "'chat_template' must be a string or null"
    if not all(len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in style.template_tokens):
        return "'template_tokens' must be [name, text] pairs"
    return None


def default_run_dir(data: str, root: str = "runs", model: str | None = None) -> str:
    """A run folder named after the data (runs/builtin, runs/instruction-data) and, for another
    model than the default, the model too (runs/builtin-smollm2-135m-instruct), so runs on
    different data or models never share a folder."""
    from instructkit.models.registry import EMBEDDED_DEFAULT

    stem = Path(data.rstrip("/")).name if not data.startswith("builtin") else data
    stem = re.sub(r"\.(jsonl?|ndjson)$", "", stem, flags=re.IGNORECASE)
    if model and model != EMBEDDED_DEFAULT:
        stem += "-" + Path(model.rstrip("/")).name.removesuffix(".gguf")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "run"
    return str(Path(root) / stem)
