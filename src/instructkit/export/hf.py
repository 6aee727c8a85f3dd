"""Export to a Hugging Face folder that `transformers` loads offline:

    config.json, generation_config.json   the architecture (families.py: hf_config) and generation defaults
    model.safetensors                     the weights in HF names (the tied head is not stored)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                          the tokenizer, with a `chat_template` made from the run's prompt
                                          style (export/templates.py)

With the template, `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders
what our engine feeds the model; for Gemma it starts with <bos>, which our tokenizer adds when it
encodes, so the token ids are identical.
"""

from __future__ import annotations

import json
from pathlib import Path

from instructkit.data.prompts import PromptStyle
from instructkit.export.templates import jinja_chat_template
from instructkit.models.families import family_of
from instructkit.models.registry import LoadedModel
from instructkit.models.tokenizer import hf_tokenizer


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf(loaded: LoadedModel, style: PromptStyle, folder: Path) -> list[Path]:
    from safetensors.torch import save_file

    model, tokenizer = loaded.model, loaded.tokenizer
    family = family_of(model.config.family)
    state = family.to_hf({name: tensor.detach().float() for name, tensor in model.state_dict().items()}, model.config)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    special = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    config = {**family.hf_config(model.config), "bos_token_id": special["bos"] if special["bos"] is not None else special["eos"],
              "eos_token_id": special["eos"], "pad_token_id": special["pad"]}
    _write_json(folder / "config.json", config)
    stops = style.stop_ids(tokenizer)
    _write_json(folder / "generation_config.json",
                {"bos_token_id": config["bos_token_id"], "eos_token_id": stops if len(stops) > 1 else stops[0],
                 "pad_token_id": special["pad"], "do_sample": False})

    backend = hf_tokenizer(tokenizer)
    backend.save(str(folder / "tokenizer.json"))
    names = {key: backend.id_to_token(value) for key, value in special.items() if value is not None}
    tokens = {f"{key}_token": name for key, name in names.items()}
    if "unk_token" not in tokens and backend.token_to_id("<unk>") is not None:
        tokens["unk_token"] = "<unk>"
    _write_json(folder / "special_tokens_map.json", tokens)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **tokens,
        "add_bos_token": tokenizer.bos_id is not None, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": model.config.context_length,
        "chat_template": jinja_chat_template(style, bos=tokenizer.bos_id is not None),
        "prompt_style": style.to_dict(),
    })
    return sorted(folder.iterdir())
