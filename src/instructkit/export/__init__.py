"""`instructkit export`: take a model out to Hugging Face, GGUF (llama.cpp) or Ollama, with the
prompt style it was trained with inside every format (export/templates.py).

Writes into a staging folder beside DIR and renames it into place at the end, so DIR is either
absent, the previous contents, or the complete export. A non-empty DIR is replaced only with
--force, and only when it holds a previous export (its instructkit-export.json says so); DIR may
not be, hold or lie in the model exported, nor be or hold the current, home or root folder.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError
from instructkit.fileio import atomic_write_json
from instructkit.models.registry import LoadedModel

FORMATS = ("hf", "gguf", "ollama")
MARKER = "instructkit-export.json"  # says a folder holds an export: the only kind --force replaces


@dataclass
class Exported:
    folder: Path
    files: list[Path]
    next_steps: list[str]


def _relation(target: Path, folder: Path) -> str | None:
    if target == folder:
        return "is"
    if target in folder.parents:
        return "contains"
    return "lies inside" if folder in target.parents else None


def _refuse_unsafe_out(out: Path, sources: list[Path]) -> None:
    """--out must neither be, hold nor sit in what is exported, nor be (or hold) the root, home or
    current folder: with --force, a mistyped --out would otherwise replace them. The closest
    relation is named ("is" before "contains")."""
    target = out.resolve()
    guarded = [("the root folder", Path("/")), ("your home folder", Path.home()), ("the current folder", Path.cwd()),
               *(("the model being exported", source) for source in sources)]
    found = [(relation, name, folder) for name, folder in guarded
             if (relation := _relation(target, folder.resolve())) is not None
             and (relation != "lies inside" or name == "the model being exported")]
    if found:
        relation, name, folder = min(found, key=lambda item: ["is", "contains", "lies inside"].index(item[0]))
        raise UserError(f"--out {out}: {relation} {name} ({folder}); choose a new folder for the export")


def _check_target(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: exists and is not empty; pass --force to replace a previous export there")
        if not (out / MARKER).is_file():
            raise UserError(f"{out}: holds files that no export wrote (no {MARKER}); --force replaces only a previous "
                            "export: choose a new folder, or empty this one yourself")


def _clean_stale_staging(out: Path) -> None:
    """Remove staging folders that earlier exports to `out` left when killed: each one's name holds
    the process id that made it, and only those of processes no longer running are removed (an
    export running beside this one keeps its own)."""
    for folder in out.parent.glob(f".{glob.escape(out.name)}.export-*"):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.export-(\d+)-.*", folder.name)
        if match and folder.is_dir() and not folder.is_symlink() and not _running(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def export_model(loaded: LoadedModel, style: PromptStyle, fmt: str, out: Path, *, quant: str | None = None,
                 force: bool = False, sources: tuple[Path, ...] = ()) -> Exported:
    """Export to the folder `out`. `sources`: paths the model was read from (a run folder, a model
    file), which `out` may not touch; the model's own folder is always among them."""
    from instructkit.export.gguf import QUANTS, plan_gguf

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "hf" and quant not in (None, "f32"):
        raise UserError("--quant applies to gguf and ollama; an hf export is fp32 safetensors")
    quant = quant or ("f32" if fmt == "hf" else "f16" if fmt == "gguf" else "q8_0")
    if fmt != "hf":
        if quant not in QUANTS:
            raise UserError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
        plan_gguf(loaded.model.config)  # a model llama.cpp would run differently stops here, in one line
    _refuse_unsafe_out(out, [*sources, *([loaded.folder] if loaded.folder is not None else [])])
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-{os.getpid()}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private to its owner
    try:
        next_steps = _write(loaded, style, fmt, quant, staging, out)
        atomic_write_json(staging / MARKER, {"format": fmt, "quant": quant, "model": loaded.name,
                                             "prompt_style": style.name})
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(out, [path for path in sorted(out.iterdir()) if path.name != MARKER], next_steps)


def _swap_in(staging: Path, out: Path) -> None:
    """Move the finished export into place. The previous one is renamed aside first (a name
    _clean_stale_staging knows), so a kill at any point leaves a whole export at `out` or a
    stale folder the next export removes, never a half-deleted one."""
    if out.exists():
        previous = staging.with_name(staging.name + "-previous")
        os.replace(out, previous)
        os.replace(staging, out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, out)


def _write(loaded: LoadedModel, style: PromptStyle, fmt: str, quant: str, staging: Path, out: Path) -> list[str]:
    from instructkit.export.gguf import plan_gguf, write_gguf
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
    write_ollama(style, staging, name, marker, plan_gguf(loaded.model.config).context_length, loaded.tokenizer.eos_text)
    tag = out.name.lower().replace("_", "-") or "instructkit"
    return [f"ollama create {tag} -f {out / 'Modelfile'}", f"ollama run {tag}"]
