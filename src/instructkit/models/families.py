"""One table per model family: what the rest of the package needs to know about a family, in one
place instead of `if family == ...` across modules (LoRA targets, the default prompt style, the
checkpoint writers and the GGUF architecture name). The weight names themselves stay in
checkpoints.py, the one module that knows checkpoint formats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from instructkit.errors import UserError
from instructkit.models import checkpoints
from instructkit.models.gemma3 import GEMMA3_PRESETS, Gemma3, Gemma3Config
from instructkit.models.gpt2 import GPT2, GPT2_PRESETS, GPT2Config


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    model_class: type
    presets: dict
    default_prompt_style: str
    # --lora-targets groups -> the suffixes of the linear layers they name.
    lora_targets: dict[str, tuple[str, ...]]
    to_hf: Callable[[dict], dict]  # our state dict -> HF names
    hf_config: Callable[[object], dict]  # our config -> HF config.json
    to_gguf: Callable[[dict], dict]  # our state dict -> GGUF names
    from_gguf: Callable[[dict], dict]  # GGUF names (dequantized) -> our state dict
    gguf_arch: str
    # The tokenizer of the family's random-weight presets (tests, benchmarks).
    preset_tokenizer_ref: dict


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2", config_class=GPT2Config, model_class=GPT2, presets=GPT2_PRESETS, default_prompt_style="alpaca",
        lora_targets={"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
        to_hf=checkpoints.gpt2_to_hf, hf_config=checkpoints.gpt2_hf_config, to_gguf=checkpoints.gpt2_to_gguf,
        from_gguf=checkpoints.gpt2_from_gguf, gguf_arch="gpt2", preset_tokenizer_ref={"kind": "gpt2"}),
    "gemma3": Family(
        name="gemma3", config_class=Gemma3Config, model_class=Gemma3, presets=GEMMA3_PRESETS, default_prompt_style="gemma",
        lora_targets={"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                      "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
        to_hf=checkpoints.gemma3_to_hf, hf_config=checkpoints.gemma3_hf_config, to_gguf=checkpoints.gemma3_to_gguf,
        from_gguf=checkpoints.gemma3_from_gguf, gguf_arch="gemma3", preset_tokenizer_ref={"kind": "embedded-gemma"}),
}


def family_of(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r} (supported: {', '.join(FAMILIES)})") from None
