"""The report: report.md and a self-contained report.html (images inlined), from one list of blocks."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from instructkit.evaluate.baselines import best_rule
from instructkit.fileio import atomic_write_bytes, atomic_write_text
from instructkit.runs import RunFolder

# A block is ("h", text) | ("p", text) | ("table", header, rows) | ("img", file name, alt) | ("pre", text)


def _histogram(scores: list[int], scale_max: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = list(range(0, 101, 10)) if scale_max == 100 else [b - 0.5 for b in range(1, scale_max + 2)]
    ax.hist(scores, bins=bins, color="#4477aa", edgecolor="white")
    ax.set_xlabel("Judge score")
    ax.set_ylabel("Entries")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _recipe_line(config: dict) -> str:
    """The recipe in one sentence, from the run's saved config."""
    trained = (f"LoRA rank {config['lora_rank']} (alpha {config.get('lora_alpha'):g}) on {', '.join(config.get('lora_targets', []))}" if config.get("lora_rank")
               else "everything but the tied embedding" if config.get("freeze_embedding") else "every weight")
    return (f"Recipe: {config.get('epochs')} epoch(s), batch {config.get('batch_size')}, AdamW peak lr {config.get('lr')} "
            f"({config.get('schedule')}, {config.get('warmup')} warm-up steps), trains {trained}, loss on "
            f"{'the responses only' if config.get('mask_instructions') else 'every token'}, prompt style "
            f"{config.get('prompt_style') or 'the model default'}, seed {config.get('seed')}. The main job's recipe and "
            "why it was chosen (on the validation split): src/instructkit/main_job.py, docs/BENCHMARKS.md.")


def _training_blocks(run: RunFolder) -> list[tuple]:
    evals = run.evals()
    config = run.config() if run.has_config() else {}
    blocks: list[tuple] = [("h", "Training")]
    if evals:
        blocks.append(("p", f"Model `{config.get('model', '?')}`, data `{config.get('data', '?')}`, "
                            f"{evals[-1]['step']} steps. Validation loss {evals[0]['val_loss']:.3f} before, "
                            f"{evals[-1]['val_loss']:.3f} after; training loss {evals[0]['train_loss']:.3f} -> "
                            f"{evals[-1]['train_loss']:.3f}."))
    if config:
        blocks.append(("p", _recipe_line(config)))
    if (coverage := run.data_coverage()) is not None:
        blocks += _coverage_blocks(coverage)
    if run.loss_plot.with_suffix(".png").exists():
        blocks.append(("img", run.loss_plot.with_suffix(".png"), "Loss plot"))
    if run.quality_plot.with_suffix(".png").exists():
        scored = [row for row in evals if "val_rouge_l" in row]
        blocks.append(("p", f"Greedy validation responses at each evaluation: ROUGE-L {scored[0]['val_rouge_l']:.3f} -> "
                            f"{scored[-1]['val_rouge_l']:.3f}, chrF {scored[0]['val_chrf']:.1f} -> {scored[-1]['val_chrf']:.1f}"
                            + (f", exact-check accuracy {scored[0]['val_accuracy']:.1%} -> {scored[-1]['val_accuracy']:.1%}"
                               if "val_accuracy" in scored[-1] else "") + "."))
        blocks.append(("img", run.quality_plot.with_suffix(".png"), "Validation quality over training"))
    return blocks


def _coverage_blocks(coverage: dict) -> list[tuple]:
    """The mask coverage of the training data (data.json): what the loss covers, supervised tokens
    per record, records cut and dropped, and the first example with its supervised spans marked."""
    rows = [[name, split["records"], split["supervised_min"], split["supervised_median"], split["supervised_max"],
             split["truncated"], split["dropped"]] for name, split in (("train", coverage["train"]), ("val", coverage["val"]))]
    return [("p", f"Data: {coverage['format']} records in prompt style {coverage['prompt_style']}; the loss covers "
                  f"{coverage['supervised']}. Supervised tokens per record:"),
            ("table", ["split", "records", "min", "median", "max", "truncated", "dropped"], rows),
            ("p", "The first training example as the model reads it, supervised tokens in [[ ]]:"),
            ("pre", coverage["example"])]


def _pct_ci(value: dict) -> str:
    return f"{value['accuracy']:.1%} [{value['ci95'][0]:.0%}, {value['ci95'][1]:.0%}]"


def _checks_blocks(result: dict) -> list[tuple]:
    """Accuracy per family beside what needs no model (majority answer, best one-line rule) and
    the base model, each with its 95% bootstrap interval."""
    checks = result["checks"]
    base = result.get("baseline", {}).get("checks")
    label = result.get("baseline", {}).get("label", "base model")
    baselines = checks.get("baselines", {})
    blocks: list[tuple] = [("h", "Exact checks (accuracy per task family)")]
    blocks.append(("p", "majority = always giving the family's most common test answer (the best any constant "
                        "answer scores); best rule = the best one-line heuristic listed for the family (e.g. copy "
                        "the input). Intervals are 95% bootstrap intervals over the entries."))
    header = ["family", "n", "majority", "best rule"] + ([label] if base else []) + ["fine-tuned" if base else "model"]
    rows = [["all", checks["n"], "", ""] + ([_pct_ci(base)] if base else []) + [_pct_ci(checks)]]
    for family, value in checks["families"].items():
        baseline = baselines.get(family)
        majority = f"{baseline['majority']:.1%}" if baseline else ""
        rule = best_rule(baseline) if baseline else None
        rule_text = f"{rule[1]:.1%} ({rule[0]})" if rule else "-"
        base_cell = [_pct_ci(base["families"][family])] if base and family in base["families"] else ([""] if base else [])
        rows.append([family, value["n"], majority, rule_text] + base_cell + [_pct_ci(value)])
    blocks.append(("table", header, rows))
    if checks["failures"]:
        blocks.append(("p", "First failures:"))
        blocks.append(("table", ["instruction", "expected", "response"],
                       [[_short(f["instruction"], 120), _short(f["expected"], 60), _short(f["response"], 120)]
                        for f in checks["failures"][:10]]))
    return blocks


def _against_blocks(against: dict) -> list[tuple]:
    """Ours against another system's responses on the same references (evaluate/compare.py)."""
    label = against["label"]
    blocks: list[tuple] = [("h", f"Against {label}")]
    blocks.append(("p", f"The same {against['n']} references. Differences are ours minus {label}; the interval is a "
                        "paired bootstrap (2,000 resamples of the items, both systems on the same resample): above "
                        "zero throughout means ours is better beyond what the choice of items explains."))
    rows = []
    for name, value in against["metrics"].items():
        low, high = value["ci95"]
        verdict = "yes" if low > 0 else ("no, worse" if high < 0 else "not clearly")
        rows.append([name, _fmt(value["ours"]), _fmt(value["other"]), f"{value['difference']:+.3f}",
                     f"[{low:+.3f}, {high:+.3f}]", verdict])
    blocks.append(("table", ["metric", "ours", label, "difference", "95% interval", "ours better?"], rows))
    blocks.append(("p", f"Per item (ROUGE-L): ours better on {against['wins']}, equal on {against['ties']}, "
                        f"worse on {against['losses']}."))
    for title, items in (("Largest gains", against["largest_gains"]), ("Largest losses", against["largest_losses"])):
        if items:
            blocks.append(("p", f"{title} (ROUGE-L difference):"))
            blocks.append(("table", ["instruction", "reference", "ours", label, "difference"],
                           [[_short(i["instruction"], 100), _short(i["reference"], 80), _short(i["ours"], 100),
                             _short(i["other"], 100), f"{i['rouge_l_difference']:+.2f}"] for i in items]))
    return blocks


def _judge_blocks(judge: dict, out_dir: Path) -> list[tuple]:
    """The judge's mean, or, when it failed (evaluation.judge_summary), that it failed and why: a
    mean over the few entries it did score would stand for a set it did not judge."""
    blocks: list[tuple] = [("h", "LLM judge")]
    about = f"Judge `{judge['model']}` ({judge['api']}, {judge['url']}), {judge['prompt']} prompt. "
    counts = (f"{len(judge['unparsed'])} replies were not a score and {len(judge['failed'])} requests failed "
              "(listed below, not dropped).")
    if judge["status"] == "failed":
        blocks.append(("p", f"Judge failed: it scored {judge['scored']} of {judge['entries']} entries "
                            f"({judge['unscored_share']:.0%} left unscored; --judge-max-failures "
                            f"{judge['max_failures']:.0%}), so no mean score is given. " + about + counts))
        blocks.append(("p", "First errors: " + "; ".join(judge["first_errors"])))
    else:
        blocks.append(("p", about + f"Mean score {judge['mean']:.2f} (95% CI {judge['ci95'][0]:.2f} to "
                            f"{judge['ci95'][1]:.2f}) over {judge['scored']} scored entries; " + counts))
        if judge["status"] == "warning":
            blocks.append(("p", f"Warning: {judge['unscored_share']:.0%} of the entries were left unscored "
                                f"(within --judge-max-failures {judge['max_failures']:.0%}); the mean leaves them out."))
    scores = [s for s in judge["scores"] if s is not None]
    if scores and judge["status"] != "failed":
        _histogram(scores, judge["scale_max"], out_dir / "score-histogram.png")
        blocks.append(("img", out_dir / "score-histogram.png", "Score histogram"))
    if judge["unparsed"]:
        blocks.append(("table", ["entry", "unparsed reply"], [[u["index"], _short(u["reply"], 200)] for u in judge["unparsed"]]))
    if judge["failed"]:
        blocks.append(("table", ["entry", "error"], [[f["index"], f["error"]] for f in judge["failed"]]))
    return blocks


def _ifeval_blocks(path: Path) -> list[tuple]:
    """IFEval's four scores, when `evaluate --benchmark ifeval --run` has been run on this run:
    beside the offline metrics and the judge's scores, one report."""
    import json

    try:
        systems = json.loads(path.read_text(encoding="utf-8"))["systems"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    from instructkit.evaluate.ifeval import SCORE_LABELS, SCORES

    names = list(systems)
    rows = [[SCORE_LABELS[score], *(f"{systems[name]['scores'][score]:.1%}" for name in names)] for score in SCORES]
    return [("h", "IFEval"), ("p", f"From `{path}` (its own report beside it has the table per instruction type)."),
            ("table", ["score", *names], rows)]


def _decoding_text(settings: dict) -> str:
    """How respond generated the responses, in words (its recorded settings)."""
    beams = settings.get("beams", 1)
    parts = [f"beam search, {beams} beams, length penalty {settings.get('length_penalty', 1.0):g}" if beams > 1 else "greedy",
             f"at most {settings.get('max_new_tokens')} new tokens"]
    if settings.get("repeat_stop"):
        parts.append(f"ended at a repeat of {settings['repeat_stop']} tokens")
    if settings.get("shots"):
        parts.append(f"{settings['shots']}-shot, first line")
    return "; ".join(parts)


def build_blocks(result: dict, entries: list[dict], out_dir: Path, run_dir: Path | None) -> list[tuple]:
    decoding = f" ({_decoding_text(result['decoding'])})" if "decoding" in result else ""
    blocks: list[tuple] = [("h", "instructkit report"), ("p", f"Responses: `{result['responses']}`{decoding}")]
    if run_dir is not None and RunFolder(run_dir).metrics_file.exists():
        blocks += _training_blocks(RunFolder(run_dir))
    blocks.append(("h", "Metrics (no judge needed)"))
    keys = ["exact_match", "normalized_match", "rouge_l", "chrf", "bleu", "empty_responses",
            "response_words_mean", "reference_words_mean"]
    base_label = result.get("baseline", {}).get("label", "base model")
    header = ["metric", "fine-tuned" if "baseline" in result else "model"] + ([base_label] if "baseline" in result else [])
    rows = [[key, _fmt(result["metrics"][key])] + ([_fmt(result["baseline"]["metrics"][key])] if "baseline" in result else [])
            for key in keys]
    blocks.append(("table", header, rows))
    if "checks" in result:
        blocks += _checks_blocks(result)
    if "against" in result:
        blocks += _against_blocks(result["against"])
    if "judge" in result:
        blocks += _judge_blocks(result["judge"], out_dir)
    if run_dir is not None:
        blocks += _ifeval_blocks(RunFolder(run_dir).ifeval_dir / "ifeval.json")
    if "pairwise" in result:
        pair = result["pairwise"]
        blocks.append(("p", f"Pairwise against `{pair['against']}`: {pair['wins']} wins, {pair['ties']} ties, "
                            f"{pair['losses']} losses ({pair['undecided']} undecided); net preference "
                            f"{pair['net_preference']:+.2f} (95% CI {pair['ci95'][0]:+.2f} to {pair['ci95'][1]:+.2f})."))
    blocks.append(("h", "Examples"))
    base_responses = result.get("baseline", {}).get("model_responses")
    header = ["instruction", "reference"] + ([base_label, "fine-tuned"] if base_responses else ["response"])
    rows = []
    for index, entry in enumerate(entries[:12]):
        instruction = entry["instruction"] + (f" — {entry['input']}" if entry.get("input") else "")
        row = [_short(instruction, 160), _short(entry["output"], 120)]
        if base_responses:
            row.append(_short(base_responses[index], 160))
        row.append(_short(entry["model_response"], 160))
        rows.append(row)
    blocks.append(("table", header, rows))
    return blocks


def render_markdown(blocks: list[tuple], out_dir: Path) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += [("# " if not lines else "## ") + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            _, header, rows = block
            cell = lambda value: str(value).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines.append("| " + " | ".join(cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            _, path, alt = block
            target = Path(path)
            try:
                link = target.relative_to(out_dir)
            except ValueError:
                link = target.resolve()
            lines += [f"![{alt}]({link})", ""]
        elif kind == "pre":
            lines += ["```", block[1], "```", ""]
    return "\n".join(lines)


def render_html(blocks: list[tuple]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>instructkit report</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
             "</style></head><body>"]
    first = True
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<{'h1' if first else 'h2'}>{html.escape(block[1])}</{'h1' if first else 'h2'}>")
            first = False
        elif kind == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            _, header, rows = block
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows]
            parts.append("</table>")
        elif kind == "img":
            _, path, alt = block
            data = base64.b64encode(Path(path).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>")
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(block[1])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result: dict, entries: list[dict], out_dir: Path, *, run_dir: Path | None = None) -> list[Path]:
    blocks = build_blocks(result, entries, out_dir, run_dir)
    markdown, html_file = RunFolder(out_dir).report_files
    return [atomic_write_text(markdown, render_markdown(blocks, out_dir)), atomic_write_text(html_file, render_html(blocks))]
