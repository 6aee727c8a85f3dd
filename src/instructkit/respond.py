"""`instructkit respond`: generate a response for every entry of a split, resumably.

Output: the chapter's format (the split's entries, each with a `model_response` key, as a JSON
list with indent 4) and a JSONL file beside it. The JSONL grows chunk by chunk (each chunk
fsynced), so an interrupted run keeps everything it finished and a rerun continues from there;
the JSON list is written atomically at the end.

A response is cut by tokens: the generated ids after the prompt, up to the end token (or EOS),
decoded and stripped; never by slicing decoded characters.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from instructkit.data.prompts import PromptStyle, get_prompt_style
from instructkit.data.tokenize import end_token_id
from instructkit.errors import UserError
from instructkit.fileio import atomic_write_json, atomic_write_text
from instructkit.generate import generate
from instructkit.models.registry import LoadedModel


def jsonl_path_for(out: Path) -> Path:
    return out.with_suffix(".jsonl")


def read_finished(jsonl: Path) -> dict[int, dict]:
    """Rows already written, by index. A torn last line (a kill mid-write) is dropped and the file
    rewritten without it."""
    if not jsonl.exists():
        return {}
    rows, good_lines = {}, []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            rows[int(row["index"])] = row
            good_lines.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    atomic_write_text(jsonl, "".join(line + "\n" for line in good_lines))
    return rows


def respond(
    loaded: LoadedModel,
    style: PromptStyle,
    entries: list[dict],
    out: Path,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 128,
    progress: bool = True,
) -> list[dict]:
    """Generate responses for `entries`, appending to out.jsonl and finally writing out (JSON)."""
    from tqdm import tqdm

    if out.suffix != ".json":
        raise UserError(f"{out}: the responses file must end in .json (a .jsonl is written beside it)")
    jsonl = jsonl_path_for(out)
    done = read_finished(jsonl)
    for index, row in done.items():
        if index >= len(entries) or row.get("instruction") != entries[index]["instruction"]:
            raise UserError(f"{jsonl}: row {index} does not match this data; remove the file or choose another --out")
    tokenizer = loaded.tokenizer
    stop_ids = sorted({tokenizer.eos_id, end_token_id(style, tokenizer)})
    todo = [i for i in range(len(entries)) if i not in done]
    # Similar lengths in a batch waste less on padding; the order of the output is unaffected.
    todo.sort(key=lambda i: len(style.prompt(entries[i])))
    bar = tqdm(total=len(entries), initial=len(done), desc="respond", unit="entry", disable=not progress)
    started, generated_tokens = time.perf_counter(), 0
    loaded.model.eval()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        prompts = [tokenizer.encode(style.prompt(entries[i])) for i in chunk]
        results = generate(loaded.model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        lines = []
        for index, result in zip(chunk, results):
            row = {"index": index, **entries[index], "model_response": result.text.strip(),
                   "finish_reason": result.finish_reason, "new_tokens": len(result.token_ids)}
            done[index] = row
            lines.append(json.dumps(row, ensure_ascii=False))
            generated_tokens += len(result.token_ids)
        with open(jsonl, "a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        bar.update(len(chunk))
        seconds = time.perf_counter() - started
        bar.set_postfix(tok_s=f"{generated_tokens / max(seconds, 1e-9):.0f}")
    bar.close()
    output = []
    for index in range(len(entries)):
        row = {key: value for key, value in done[index].items() if key not in ("index", "finish_reason", "new_tokens")}
        output.append(row)
    atomic_write_json(out, output, indent=4)
    return output


def style_for(loaded: LoadedModel, run_dir: Path | None, name: str | None) -> PromptStyle:
    """The prompt style: explicit, else the run folder's saved one, else the model's default."""
    if name:
        return get_prompt_style(name)
    if run_dir is not None and (run_dir / "prompt_style.json").exists():
        return PromptStyle.from_dict(json.loads((run_dir / "prompt_style.json").read_text()))
    return get_prompt_style(loaded.default_prompt_style)
