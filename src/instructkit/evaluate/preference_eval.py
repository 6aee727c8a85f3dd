"""Judging a DPO run without a judge (`instructkit evaluate --preferences R2`).

On held-out preference pairs (the test split by default), for the starting (SFT) model and the
DPO model side by side:
  - implicit-reward accuracy: the share of pairs where beta (log pi(chosen) - log ref(chosen)) >
    beta (log pi(rejected) - log ref(rejected)), the reference being the starting model (so the
    starting model's own rewards are all zero), and the mean reward margin;
  - likelihood preference: the share of pairs where the model gives the chosen response a higher
    (length-normalised) log-probability than the rejected one;
  - generated responses (greedy) scored against the chosen and against the rejected responses.
With a judge URL, the judge also compares the two models' responses pairwise. Results go into
evaluation-preferences.json and the report beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from instructkit.data.preferences import encode_pairs, load_preferences
from instructkit.decode.generate import generate
from instructkit.decode.load import load_start
from instructkit.errors import UserError
from instructkit.evaluate.metrics import summarize
from instructkit.fileio import atomic_write_json
from instructkit.runs import RunFolder
from instructkit.train.dpo import DPOConfig, reference_logprobs, start_model


def _responses(loaded, style, records, max_new_tokens: int) -> list[str]:
    tokenizer = loaded.tokenizer
    stops = style.stop_ids(tokenizer)
    prompts = [tokenizer.encode_prompt(style.conversation(r["messages"], tokenizer.eos_text) if "messages" in r else style.prompt(r))
               for r in records]
    return [r.text.strip() for r in generate(loaded.model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stops)]


def evaluate_preferences(run: RunFolder, *, data: str | None = None, split: str = "test", max_new_tokens: int = 128,
                         judge=None, out_dir: Path | None = None) -> dict:
    run.require_finished()
    config = DPOConfig.from_dict(run.config())
    prefs = load_preferences(data or config.data, skip_invalid=config.skip_invalid)
    records = prefs.splits.by_name(split)
    start, style = start_model(config)
    tuned = load_start(str(run.path)).loaded
    pairs, report = encode_pairs(records, style, start.tokenizer, append_eos=config.append_eos, max_length=config.max_length)
    kept = [r for i, r in enumerate(records) if i not in set(report.dropped_indices)]
    if not pairs:
        raise UserError(f"{prefs.path}: no usable {split} pairs")
    pad = start.tokenizer.pad_id
    with torch.no_grad():
        reference = reference_logprobs(start.model, pairs, pad, config.logp_reduction, config.batch_size)
        policy = reference_logprobs(tuned.model, pairs, pad, config.logp_reduction, config.batch_size)
        margins = config.beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    result = {"run": str(run.path), "start": config.start, "data": str(prefs.path), "split": split, "pairs": len(pairs),
              "dropped": len(report.dropped_indices), "beta": config.beta, "logp_reduction": config.logp_reduction}
    result["implicit_reward"] = {"dpo": {"accuracy": float((margins > 0).float().mean()), "mean_margin": float(margins.mean())},
                                 "sft": {"accuracy": 0.0, "mean_margin": 0.0, "note": "the reference itself: every reward is 0"}}
    result["likelihood_preference"] = {name: float((logps[:, 0] > logps[:, 1]).float().mean())
                                       for name, logps in (("sft", reference), ("dpo", policy))}
    generated = {"sft": _responses(start, style, kept, max_new_tokens), "dpo": _responses(tuned, style, kept, max_new_tokens)}
    result["responses"] = {}
    for name, texts in generated.items():
        against_chosen, _ = summarize(texts, [r["chosen"] for r in kept])
        against_rejected, _ = summarize(texts, [r["rejected"] for r in kept])
        result["responses"][name] = {
            "vs_chosen": {k: against_chosen[k] for k in ("rouge_l", "chrf", "bleu")},
            "vs_rejected": {k: against_rejected[k] for k in ("rouge_l", "chrf", "bleu")},
            "words_mean": against_chosen["response_words_mean"]}
    out_dir = out_dir or run.path
    samples = [{"instruction": r["instruction"], "input": r["input"], "chosen": r["chosen"], "sft": a, "dpo": b}
               for r, a, b in zip(kept, generated["sft"], generated["dpo"])]
    if judge is not None:
        from instructkit.evaluate.judge import judge_pairwise
        from instructkit.evaluate.stats import bootstrap_mean_ci

        as_entries = lambda key: [{"instruction": s["instruction"], "input": s["input"], "output": s["chosen"],  # noqa: E731
                                   "model_response": s[key]} for s in samples]
        outcomes = judge_pairwise(as_entries("dpo"), as_entries("sft"), judge, RunFolder(out_dir).judge_cache)
        decided = [o for o in outcomes if o is not None]
        mean, low, high = bootstrap_mean_ci(decided)
        result["pairwise_judge"] = {"model": judge.model, "dpo_wins": decided.count(1), "ties": decided.count(0),
                                    "sft_wins": decided.count(-1), "undecided": outcomes.count(None),
                                    "net_preference": mean, "ci95": [low, high]}
    result["samples"] = samples[:10]
    atomic_write_json(out_dir / "evaluation-preferences.json", result, indent=2)
    _write_report(result, out_dir)
    return result


def _write_report(result: dict, out_dir: Path) -> None:
    from instructkit.evaluate.report import _short, render_html, render_markdown
    from instructkit.fileio import atomic_write_text

    reward, likelihood = result["implicit_reward"], result["likelihood_preference"]
    blocks = [("h", "Preference evaluation (DPO)"),
              ("p", f"Run `{result['run']}`, started from `{result['start']}`; {result['pairs']} held-out {result['split']} "
                    f"pairs of `{result['data']}` ({result['dropped']} dropped); beta {result['beta']}, "
                    f"{result['logp_reduction']} log-probs. The reference of the implicit reward is the starting model.")]
    rows = [["implicit-reward accuracy", f"{reward['sft']['accuracy']:.1%} (by definition)", f"{reward['dpo']['accuracy']:.1%}"],
            ["mean reward margin", f"{reward['sft']['mean_margin']:.3f}", f"{reward['dpo']['mean_margin']:.3f}"],
            ["likelihood prefers chosen", f"{likelihood['sft']:.1%}", f"{likelihood['dpo']:.1%}"]]
    for target in ("vs_chosen", "vs_rejected"):
        for metric in ("rouge_l", "chrf", "bleu"):
            rows.append([f"responses {metric} {target.replace('_', ' ')}",
                         f"{result['responses']['sft'][target][metric]:.3f}", f"{result['responses']['dpo'][target][metric]:.3f}"])
    blocks.append(("table", ["measure", "starting model (SFT)", "after DPO"], rows))
    if "pairwise_judge" in result:
        judged = result["pairwise_judge"]
        blocks.append(("p", f"Judge `{judged['model']}`, pairwise: DPO better on {judged['dpo_wins']}, ties {judged['ties']}, "
                            f"SFT better on {judged['sft_wins']} ({judged['undecided']} undecided); net preference "
                            f"{judged['net_preference']:+.2f} (95% CI {judged['ci95'][0]:+.2f} to {judged['ci95'][1]:+.2f})."))
    blocks.append(("h", "Examples"))
    blocks.append(("table", ["instruction", "chosen", "starting model", "after DPO"],
                   [[_short(s["instruction"], 120), _short(s["chosen"], 100), _short(s["sft"], 120), _short(s["dpo"], 120)]
                    for s in result["samples"]]))
    atomic_write_text(out_dir / "report-preferences.md", render_markdown(blocks, out_dir))
    atomic_write_text(out_dir / "report-preferences.html", render_html(blocks))
