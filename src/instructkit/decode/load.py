"""The one loader: a `--run`/`--model` spec plus how to decode -> a model ready to answer.

Every command that talks to a model (generate, respond, chat, serve, evaluate's preference
report, DPO's starting and reference model, the main job, the benchmarks) calls `load_for_talk`
or, for weights that will train, `load_start`. The prompt-style rule is written once, in
`prompt_style_for`:

    an explicit --prompt-style  >  the run folder's saved style  >  the model's own chat template
    >  the model family's default

and a command that must not guess (chat and serve, where a base model's family default would
render turns the model never saw) passes `strict=True`, which refuses the last step (a model's
own template is no guess: an instruct model is served with it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from instructkit.data.prompts import PromptStyle, resolve_prompt_style
from instructkit.errors import UserError
from instructkit.models.registry import LoadedModel, load_model
from instructkit.runs import RunFolder

# Chat and serving decode one or a few sequences at a time, which is bound by reading the weights:
# "auto" picks the mode measured fastest while greedy output stays within the agreement target
# (decode/quantize.py auto_mode: int8 where FBGEMM exists, else exact fp32).
TALK_QUANTIZE = "auto"
# When the decode step is compiled (decode/static_decode.py): "background" answers eagerly at once and
# switches to the compiled step when a thread has made it (decode/background.py; chat's and serve's
# default), "now" compiles before the first answer (what --compile alone means), "off" never.
COMPILE_MODES = ("background", "now", "off")
TALK_COMPILE = "background"


@dataclass
class Ready:
    """A loaded model, the prompt style it is talked to in, and the run folder it came from."""

    loaded: LoadedModel
    style: PromptStyle
    run: RunFolder | None = None

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def source_of(run: str | Path | None, model: str | None, command: str = "this command") -> tuple[str, RunFolder | None]:
    """The spec to load and the run folder behind it: exactly one of --run and --model; a finished
    run folder given as --model counts as --run (it keeps its saved prompt style)."""
    if bool(run) == bool(model):
        raise UserError(f"{command} needs exactly one of --run RUN_DIR or --model SPEC")
    if run is None and RunFolder(model).has_config():
        run = model
    if run is not None:
        folder = RunFolder(run).require_finished()
        return str(folder.path), folder
    return model, None


def prompt_style_for(loaded: LoadedModel, run: RunFolder | None, name: str | None, *, strict: bool = False) -> PromptStyle:
    """The prompt style (see the module docstring for the rule)."""
    if name:
        return resolve_prompt_style(name, loaded)
    saved = run.prompt_style() if run is not None else None
    if saved is not None:
        return saved
    if loaded.chat_template is not None and loaded.default_prompt_style == "model":
        return resolve_prompt_style("model", loaded)
    if strict:
        raise UserError(f"{loaded.name} has no saved prompt style; pass --prompt-style "
                        "(model, alpaca, phi3, gemma, chatml or llama3) "
                        "so messages are rendered the way the model expects")
    return resolve_prompt_style(loaded.default_prompt_style, loaded)


def quantize_loaded(loaded: LoadedModel, mode: str, *, shortlist: int | None = 32) -> LoadedModel:
    """Low-precision decoding weights (decode/quantize.py; "auto" = its auto_mode), cached beside
    the model folder, so the next start skips the quantizing."""
    from instructkit.decode.quantize import auto_mode, quantize_model

    mode = auto_mode() if mode == "auto" else mode
    folder = loaded.folder
    cache = folder / f"quantized-{mode}.safetensors" if folder is not None and os.access(folder, os.W_OK) else None
    quantize_model(loaded.model, mode, cache=cache, source=folder / "model.safetensors" if folder else None,
                   shortlist=shortlist)
    return loaded


def compile_mode(compile: bool | str) -> str:
    """--compile's value as one of COMPILE_MODES (True is "now", False "off": the older booleans)."""
    mode = {True: "now", False: "off", None: "off"}.get(compile, compile)
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    return mode


def prepare_for_decoding(loaded: LoadedModel, *, device: str = "cpu", precision: str = "fp32", quantize: str = "none",
                         compile: bool | str = False) -> LoadedModel:
    """Decoding weights made (CPU kernels only: "auto" means exact weights on a GPU), the model
    put on `device` in `precision`, and the decode step compiled as `compile` says (COMPILE_MODES;
    True = "now")."""
    from instructkit.devices import place_for_inference, resolve_device

    compile = compile_mode(compile)
    where = resolve_device(device, precision)
    if where.type != "cpu":
        if quantize not in ("none", "auto"):
            raise UserError(f"--quantize {quantize} runs on CPU kernels; with --device {where.type} use --quantize none")
        quantize = "none"
    quantize_loaded(loaded, quantize)
    place_for_inference(loaded.model, where, precision)
    if compile == "now":
        from instructkit.decode import static_decode

        print("Compiling the decode step (torch.compile; seconds from the compile cache, up to ~100 s the first time "
              "on a machine)...", file=sys.stderr, flush=True)
        static_decode.enable(loaded.model)
    elif compile == "background":
        from instructkit.decode.background import compile_in_background

        compile_in_background(loaded.model)
    return loaded


def load_for_talk(*, run: str | Path | None = None, model: str | None = None, prompt_style: str | None = None,
                  strict_style: bool = False, device: str = "cpu", precision: str = "fp32", quantize: str = "none",
                  compile: bool | str = False, command: str = "this command") -> Ready:
    """A model to generate with: loaded from its spec, decoding weights made, placed, compiled."""
    spec, folder = source_of(run, model, command)
    loaded = prepare_for_decoding(load_model(spec), device=device, precision=precision, quantize=quantize,
                                  compile=compile)
    return Ready(loaded, prompt_style_for(loaded, folder, prompt_style, strict=strict_style), folder)


def load_start(spec: str, *, prompt_style: str | None = None, seed: int = 0) -> Ready:
    """A model whose weights will train or score (exact fp32, on the CPU until the caller moves it):
    a finished run folder keeps its saved style; any other spec gets the family's default."""
    folder = RunFolder(spec)
    run = folder.require_finished() if folder.path.is_dir() and folder.has_config() else None
    loaded = load_model(str(run.path) if run else spec, seed=seed)
    return Ready(loaded, prompt_style_for(loaded, run, prompt_style), run)
