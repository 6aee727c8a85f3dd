"""`instructkit export`: take a model out to Hugging Face, GGUF (llama.cpp) or Ollama, with the
prompt style it was trained with inside every format (export/templates.py).

Writes into a staging folder beside DIR and renames it into place at the end, so DIR is either
absent, the previous contents, or the complete export; a non-empty DIR is replaced only with
--force.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError
from instructkit.models.registry import LoadedModel

FORMATS = ("hf", "gguf", "ollama")


@dataclass
class Exported:
    folder: Path
    files: list[Path]
    next_steps: list[str]


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not empty; pass --force to replace it")


def export_model(loaded: LoadedModel, style: PromptStyle, fmt: str, out: Path, *, quant: str | None = None,
                 force: bool = False) -> Exported:
    from instructkit.export.gguf import QUANTS, check_llama_cpp_compatible

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "hf" and quant not in (None, "f32"):
        raise UserError("--quant applies to gguf and ollama; an hf export is fp32 safetensors")
    quant = quant or ("f32" if fmt == "hf" else "f16" if fmt == "gguf" else "q8_0")
    if fmt != "hf":
        if quant not in QUANTS:
            raise UserError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
        check_llama_cpp_compatible(loaded.model.config)
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private to its owner
    try:
        next_steps = _write(loaded, style, fmt, quant, staging, out)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(out, sorted(out.iterdir()), next_steps)


def _write(loaded: LoadedModel, style: PromptStyle, fmt: str, quant: str, staging: Path, out: Path) -> list[str]:
    from instructkit.export.gguf import write_gguf
    from instructkit.export.hf import write_hf
    from instructkit.export.ollama import write_ollama

    if fmt == "hf":
        write_hf(loaded, style, staging)
        return [f"python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
                f"AutoModelForCausalLM.from_pretrained('{out}'); AutoTokenizer.from_pretrained('{out}')\""]
    name = f"model-{quant}.gguf" if fmt == "gguf" else "model.gguf"
    write_gguf(loaded, style, staging / name, quant)
    if fmt == "gguf":
        return [f"llama-cli -m {out / name} -cnv", f"llama-server -m {out / name} --jinja",
                f"python -c \"from llama_cpp import Llama; Llama('{out / name}').create_chat_completion("
                f"messages=[{{'role': 'user', 'content': 'Hello'}}])\""]
    marker = style.end_marker if style.end_marker and loaded.tokenizer.token_id(style.end_marker) is not None else None
    write_ollama(style, staging, name, marker, loaded.model.config.context_length)
    tag = out.name.lower().replace("_", "-") or "instructkit"
    return [f"ollama create {tag} -f {out / 'Modelfile'}", f"ollama run {tag}"]
