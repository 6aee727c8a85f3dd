"""Export for Ollama: the GGUF plus a Modelfile.

Ollama recognises only near-exact copies of a few known chat templates by itself, so the
Modelfile carries an explicit Go text/template TEMPLATE generated from the run's prompt style
(export/templates.py), one `PARAMETER stop` line per text that ends an answer, and greedy
generation by default (temperature 0), as our `generate` and `respond` decode.
"""

from __future__ import annotations

import json
from pathlib import Path

from instructkit.data.prompts import PromptStyle
from instructkit.errors import UserError
from instructkit.export.templates import go_template


def modelfile(style: PromptStyle, gguf_name: str, end_marker_text: str | None, context: int, eos_text: str = "") -> str:
    template = go_template(style, eos_text)
    if '"""' in template:
        raise UserError(f"prompt style {style.name!r} contains three double quotes, which a Modelfile TEMPLATE cannot hold")
    stops = list(dict.fromkeys([*(s for s in [end_marker_text] if s), *style.stop_strings]))
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {min(context, 4096)}"]
    return "\n".join(lines) + "\n"


def write_ollama(style: PromptStyle, folder: Path, gguf_name: str, end_marker_text: str | None, context: int,
                 eos_text: str = "") -> Path:
    path = folder / "Modelfile"
    path.write_text(modelfile(style, gguf_name, end_marker_text, context, eos_text), encoding="utf-8")
    return path
