"""`instructkit respond`: generate a response for every entry of a split, resumably.

Output: the chapter's format (the split's entries, each with a `model_response` key, as a JSON
list with indent 4) and a JSONL file beside it. The JSONL grows row by row as rows end (each row
fsynced), so an interrupted run keeps everything it finished and a rerun continues from there;
the JSON list is written atomically at the end. A rerun only continues rows that match it: the
same record (instruction, input and output) at the same index, made with the same generation
settings (model, prompt style, token budget, few-shot examples, weight quantization and
precision); anything else is refused.

A response is cut by tokens: the generated ids after the prompt, up to the end token (or EOS),
decoded and stripped; never by slicing decoded characters. With `shots` (a base model), each
prompt carries k solved training examples first and the answer is the first line written.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from instructkit.data.conversations import scored_entries
from instructkit.data.fewshot import few_shot_prompt, first_line, pick_shots
from instructkit.data.prompts import PromptStyle
from instructkit.decode.beam import beam_search
from instructkit.decode.generate import generate
from instructkit.errors import UserError
from instructkit.fileio import append_jsonl, atomic_write_json, atomic_write_jsonl, read_jsonl
from instructkit.models.registry import LoadedModel

RECORD_FIELDS = ("instruction", "input", "output")
ROW_ONLY_KEYS = ("index", "finish_reason", "new_tokens", "settings")
# A base model's few-shot answer ends at the first line; stop soon after it.
FEW_SHOT_STOPS = ("\n\n", "###")


def jsonl_path_for(out: Path) -> Path:
    return out.with_suffix(".jsonl")


def decoding_settings(out: Path) -> dict | None:
    """How the responses in `out` were generated (the settings respond recorded in the JSONL beside
    it), or None for a file made elsewhere (the book's responses, say)."""
    rows = read_jsonl(jsonl_path_for(out)) if jsonl_path_for(out).exists() else []
    settings = [row.get("settings") for row in rows if isinstance(row, dict)]
    return settings[0] if settings and all(s == settings[0] for s in settings) else None


def read_finished(jsonl: Path) -> dict[int, dict]:
    """Rows already written, by index. A torn last line (a kill mid-write) is dropped and the file
    rewritten without it."""
    rows = {int(row["index"]): row for row in read_jsonl(jsonl) if isinstance(row, dict) and "index" in row}
    if jsonl.exists():
        atomic_write_jsonl(jsonl, list(rows.values()))  # in the order they were written
    return rows


# Settings recorded only when they differ from these, so rows written before they were recorded
# (all made with these) still resume.
WEIGHTS_DEFAULTS = {"quantize": "none", "precision": "fp32"}
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def weights_settings(model: torch.nn.Module) -> dict:
    """How the weights decode: rows made under int8 or bf16 differ from fp32 ones, so one file must
    not mix them (a run killed under one and resumed under the other)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    actual = {"quantize": getattr(model, "quantized", "none"), "precision": PRECISIONS.get(dtype, str(dtype))}
    return {key: value for key, value in actual.items() if value != WEIGHTS_DEFAULTS[key]}


def _differences(before: object, now: dict) -> str:
    before = before if isinstance(before, dict) else {}
    keys = [*now, *(key for key in before if key not in now)]
    shown = [f"{key}: {before.get(key, WEIGHTS_DEFAULTS.get(key))} -> {now.get(key, WEIGHTS_DEFAULTS.get(key))}"
             for key in keys if before.get(key) != now.get(key)]
    return ", ".join(shown)


def _same_record(row: dict, entry: dict) -> bool:
    return all(row.get(name, "") == entry.get(name, "") for name in RECORD_FIELDS)


def respond(
    loaded: LoadedModel,
    style: PromptStyle,
    entries: list[dict],
    out: Path,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 128,
    shots: int = 0,
    shot_pool: list[dict] | None = None,
    progress: bool = True,
    repeat_stop: int = 0,
    beams: int = 1,
    length_penalty: float = 1.0,
) -> list[dict]:
    """Generate responses for `entries`, appending to out.jsonl and finally writing out (JSON).
    `repeat_stop` > 0 ends a response that starts repeating its last that many tokens (generate.Request).
    `beams` > 1: beam search with that many beams and `length_penalty` (beam.py) instead of
    greedy or sampled decoding."""
    from tqdm import tqdm

    if out.suffix != ".json":
        raise UserError(f"{out}: the responses file must end in .json (a .jsonl is written beside it)")
    if shots and not shot_pool:
        raise UserError("few-shot responses need a pool of solved examples (the training split)")
    if beams < 1:
        raise UserError(f"--beams must be 1 (greedy) or more, got {beams}")
    if beams > 1 and shots:
        raise UserError("--beams does not combine with --few-shot (a few-shot answer ends at a stop string, "
                        "which beam search does not track)")
    if shots and any("messages" in entry for entry in entries):
        raise UserError("--few-shot prompts are built from Alpaca records; these are conversations")
    entries = [entry for record in entries for entry in scored_entries(record)]  # a conversation: every turn
    settings = {"model": loaded.name, "prompt_style": style.name, "max_new_tokens": max_new_tokens, "shots": shots}
    if repeat_stop:
        settings["repeat_stop"] = repeat_stop
    if beams > 1:
        settings |= {"beams": beams, "length_penalty": length_penalty}
    settings |= weights_settings(loaded.model)
    jsonl = jsonl_path_for(out)
    done = read_finished(jsonl)
    for index, row in done.items():
        if index >= len(entries) or not _same_record(row, entries[index]):
            raise UserError(f"{jsonl}: row {index} holds another record than this data's; remove the file or choose another --out")
        if row.get("settings") != settings:
            raise UserError(f"{jsonl}: row {index} was made with other settings ({_differences(row.get('settings'), settings)}); "
                            "rerun with those, or remove the file or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = loaded.tokenizer

    def prompt_of(entry: dict) -> str:
        if not shots:
            return style.prompt_of(entry, tokenizer.eos_text)
        return few_shot_prompt(style, entry, pick_shots(entry, shot_pool, shots))

    stop_ids = style.stop_ids(tokenizer)
    todo = [i for i in range(len(entries)) if i not in done]
    prompts = {i: prompt_of(entries[i]) for i in todo}
    # Similar lengths in a batch waste less on padding; the order of the output is unaffected.
    todo.sort(key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(entries), initial=len(done), desc="respond", unit="entry", disable=not progress)
    started, generated_tokens = time.perf_counter(), 0
    loaded.model.eval()

    def finish(index: int, result) -> None:
        nonlocal generated_tokens
        text = first_line(result.text) if shots else result.text.strip()
        row = {"index": index, **entries[index], "model_response": text, "finish_reason": result.finish_reason,
               "new_tokens": len(result.token_ids), "settings": settings}
        done[index] = row
        append_jsonl(jsonl, [row])  # fsynced: a kill keeps every finished row
        generated_tokens += len(result.token_ids)
        bar.update(1)
        bar.set_postfix(tok_s=f"{generated_tokens / max(time.perf_counter() - started, 1e-9):.0f}")

    if beams > 1:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            results = beam_search(loaded.model, tokenizer, [tokenizer.encode_prompt(prompts[i]) for i in chunk], beams=beams,
                                  length_penalty=length_penalty, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                  repeat_stop=repeat_stop)
            for index, result in zip(chunk, results):
                finish(index, result)
    elif todo:
        # Continuous batching: at most batch_size rows at once, the next prompts joining as rows end,
        # each row written as it ends.
        generate(loaded.model, tokenizer, [tokenizer.encode_prompt(prompts[i]) for i in todo],
                 max_new_tokens=max_new_tokens, stop_ids=stop_ids, stop_strings=FEW_SHOT_STOPS if shots else (),
                 repeat_stop=repeat_stop, max_batch=batch_size, on_finished=lambda row, result: finish(todo[row], result))
    bar.close()
    output = [{key: value for key, value in done[index].items() if key not in ROW_ONLY_KEYS} for index in range(len(entries))]
    atomic_write_json(out, output, indent=4)
    return output
