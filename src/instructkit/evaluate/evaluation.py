"""`instructkit evaluate`: metrics for a responses file, optionally an LLM judge, then the report."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from instructkit.errors import UserError
from instructkit.evaluate.judge import JudgeConfig, judge_pairwise, judge_responses
from instructkit.evaluate.metrics import summarize
from instructkit.evaluate.stats import bootstrap_mean_ci, kendall_tau_b, pearson, spearman
from instructkit.fileio import atomic_write_json
from instructkit.respond import decoding_settings
from instructkit.runs import RunFolder


def load_responses(path: Path) -> list[dict]:
    """A responses file in the chapter's format: a JSON list of entries with `model_response`."""
    from instructkit.data.records import check_problem, parse_records

    if not path.exists():
        raise UserError(f"{path}: no such responses file")
    entries = []
    for where, value in parse_records(path):
        if not isinstance(value, dict):
            raise UserError(f"{path}: {where}: expected an object")
        for key in ("instruction", "output", "model_response"):
            if not isinstance(value.get(key), str):
                raise UserError(f"{path}: {where}: missing or non-string {key!r}")
        if "check" in value and (problem := check_problem(value["check"])) is not None:
            raise UserError(f"{path}: {where}: {problem}")
        entries.append({"input": "", **value})
    if not entries:
        raise UserError(f"{path}: no entries")
    return entries


def load_scores(path: Path) -> list[float]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read a JSON list of scores ({exc})") from None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{path}: expected a JSON list of numbers")
    return [float(v) for v in values]


def agreement(a: list[float], b: list[float], names: tuple[str, str]) -> dict:
    if len(a) != len(b):
        raise UserError(f"cannot pair score files: {names[0]} has {len(a)} scores, {names[1]} has {len(b)}")
    return {"n": len(a), "mean_a": sum(a) / len(a), "mean_b": sum(b) / len(b),
            "pearson": pearson(a, b), "spearman": spearman(a, b), "kendall_tau_b": kendall_tau_b(a, b)}


def judge_summary(verdicts, scale_high: int, max_failures: float) -> dict:
    """Scores, what was left unscored, and a status: "failed" when the judge scored none of the
    entries it was asked about or left more than `max_failures` of all entries unscored, "warning"
    when it left some, else "ok". With nothing scored the mean is None (never NaN)."""
    scores = [v.score for v in verdicts if v.score is not None]
    unparsed = [{"index": v.index, "reply": v.reply} for v in verdicts if v.status == "unparsed"]
    failed = [{"index": v.index, "error": v.error} for v in verdicts if v.status == "failed"]
    asked = [v for v in verdicts if v.asked]
    unscored = len(unparsed) + len(failed)
    share = unscored / len(verdicts) if verdicts else 0.0
    if (asked and all(v.score is None for v in asked)) or share > max_failures:
        status = "failed"
    else:
        status = "warning" if unscored else "ok"
    mean, low, high = bootstrap_mean_ci(scores) if scores else (None, None, None)
    first = [f"entry {f['index']}: {f['error']}" for f in failed[:3]]
    first += [f"entry {u['index']}: reply {str(u['reply'])[:60]!r} is not a score" for u in unparsed[:3 - len(first)]]
    return {
        "status": status, "scored": len(scores), "entries": len(verdicts), "unscored_share": share,
        "max_failures": max_failures, "first_errors": first, "unparsed": unparsed, "failed": failed,
        "mean": mean, "ci95": [low, high], "scale_max": scale_high,
        "scores": [v.score for v in verdicts],
    }


def judge_problem(judge: dict) -> str | None:
    """One line on a judge that failed or left entries unscored (None when it scored them all)."""
    if judge["status"] == "ok":
        return None
    verb = "judge failed" if judge["status"] == "failed" else "judge left entries unscored"
    return (f"{verb}: {judge['scored']} of {judge['entries']} entries scored, {len(judge['failed'])} requests failed, "
            f"{len(judge['unparsed'])} replies not a score ({judge['unscored_share']:.0%} unscored; "
            f"--judge-max-failures {judge['max_failures']:.0%}); first: {'; '.join(judge['first_errors'])}")


def evaluate_file(
    responses_path: Path,
    *,
    out_dir: Path,
    judge: JudgeConfig | None = None,
    baseline_path: Path | None = None,
    baseline_label: str = "base model",
    compare_path: Path | None = None,
    against_path: Path | None = None,
    against_label: str | None = None,
    run_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    from instructkit.evaluate.checks import score_checks
    from instructkit.evaluate.report import write_report

    entries = load_responses(responses_path)
    summary, per_entry = summarize([e["model_response"] for e in entries], [e["output"] for e in entries])
    result = {"responses": str(responses_path), "metrics": summary, "entries": [asdict(m) for m in per_entry]}
    if (decoding := decoding_settings(responses_path)) is not None:
        result["decoding"] = decoding
    checks = score_checks(entries)
    if checks is not None:
        from instructkit.evaluate.baselines import family_baselines

        result["checks"] = {**checks, "baselines": family_baselines(entries)}
    if baseline_path is not None:
        baseline = load_responses(baseline_path)
        if [e["instruction"] for e in baseline] != [e["instruction"] for e in entries]:
            raise UserError(f"{baseline_path}: covers different entries than {responses_path}")
        base_summary, _ = summarize([e["model_response"] for e in baseline], [e["output"] for e in baseline])
        if [(e["input"], e["output"]) for e in baseline] != [(e["input"], e["output"]) for e in entries]:
            raise UserError(f"{baseline_path}: covers different entries than {responses_path}")
        result["baseline"] = {"responses": str(baseline_path), "label": baseline_label, "metrics": base_summary,
                              "model_responses": [e["model_response"] for e in baseline]}
        base_checks = score_checks(baseline)
        if base_checks is not None:
            result["baseline"]["checks"] = base_checks
    if against_path is not None:
        from instructkit.evaluate.compare import compare_entries

        result["against"] = {"responses": str(against_path), "label": against_label or against_path.stem,
                             **compare_entries(entries, load_responses(against_path))}
    if judge is not None:
        cache = RunFolder(out_dir).judge_cache
        verdicts = judge_responses(entries, judge, cache, progress=progress)
        from instructkit.evaluate.judge import PROMPTS

        result["judge"] = {"model": judge.model, "api": judge.api, "url": judge.url, "prompt": judge.prompt,
                           **judge_summary(verdicts, PROMPTS[judge.prompt][2], judge.max_failures)}
        if compare_path is not None:
            outcomes = judge_pairwise(entries, load_responses(compare_path), judge, cache, progress=progress)
            decided = [o for o in outcomes if o is not None]
            mean, low, high = bootstrap_mean_ci(decided)
            result["pairwise"] = {"against": str(compare_path), "wins": decided.count(1), "ties": decided.count(0),
                                  "losses": decided.count(-1), "undecided": outcomes.count(None),
                                  "net_preference": mean, "ci95": [low, high]}
    elif compare_path is not None:
        raise UserError("--compare needs a judge: pass --judge-url and --judge-model")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RunFolder(out_dir).evaluation_file, result, indent=2)
    write_report(result, entries, out_dir, run_dir=run_dir)
    return result
