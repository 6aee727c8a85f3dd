"""`instructkit export`: a model to Hugging Face, GGUF (llama.cpp) or Ollama."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from instructkit.cli.common import add_run_or_model


def register(subcommands) -> None:
    exp = subcommands.add_parser("export", help="export a model to Hugging Face, GGUF (llama.cpp) or Ollama")
    add_run_or_model(exp, "a finished fine-tuning run folder (LoRA runs are exported merged)",
                     "or any model spec, e.g. gemma-3-270m (the embedded base model)")
    exp.add_argument("--prompt-style", default=None, help="with --model: the style to write into the templates")
    exp.add_argument("--format", required=True, help="hf, gguf or ollama")
    exp.add_argument("--quant", default=None,
                     help="gguf/ollama: f32, f16 (gguf default), q8_0 (ollama default) or q4_k_m (needs llama-cpp-python)")
    exp.add_argument("--out", required=True, help="folder to write (refused if it exists and is not empty)")
    exp.add_argument("--force", action="store_true", help="replace a previous export in --out")
    exp.set_defaults(handler=cmd_export)


def _model_and_style(args: argparse.Namespace):
    """The model and prompt style to export: a finished run folder (its saved style), or any
    --model spec (its --prompt-style, else the model's default)."""
    from instructkit.decode.load import load_for_talk

    ready = load_for_talk(run=args.run, model=args.model, prompt_style=args.prompt_style, command=args.command)
    return ready.loaded, ready.style


def cmd_export(args: argparse.Namespace) -> int:
    from instructkit.export import export_model

    started = time.perf_counter()
    loaded, style = _model_and_style(args)
    sources = tuple(Path(spec) for spec in (args.run, args.model) if spec and Path(spec).exists())
    exported = export_model(loaded, style, args.format, Path(args.out), quant=args.quant, force=args.force,
                            sources=sources)
    total = sum(path.stat().st_size for path in exported.files)
    print(f"Exported {loaded.name} ({args.format}, prompt style {style.name}) to {exported.folder}: "
          f"{len(exported.files)} files, {total / 1e6:,.0f} MB, in {time.perf_counter() - started:.1f} s")
    print("Next:")
    for step in exported.next_steps:
        print(f"  {step}")
    return 0
