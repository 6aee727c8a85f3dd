"""`instructkit evaluate`: score responses (metrics, optional LLM judge, report), two judges'
agreement, or a DPO run against its starting model."""

from __future__ import annotations

import argparse
from pathlib import Path

from instructkit.cli.common import (add_judge_options, judge_config, judge_exit_status, positive, print_evaluation,
                                   print_report_files)
from instructkit.errors import UserError
from instructkit.runs import RunFolder


def register(subcommands) -> None:
    ev = subcommands.add_parser("evaluate", help="score responses: offline metrics, optional LLM judge, report")
    ev.add_argument("--responses", default=None, help="responses file (the chapter's format)")
    ev.add_argument("--baseline", default=None, help="responses of a base model, shown side by side")
    ev.add_argument("--compare", default=None, help="another responses file to judge pairwise against")
    ev.add_argument("--preferences", default=None, metavar="DPO_RUN",
                    help="evaluate a DPO run against its starting model on held-out preference pairs (no judge needed)")
    ev.add_argument("--data", default=None, help="with --preferences: the preference data (default: the run's)")
    ev.add_argument("--split", default="test", help="with --preferences: train, test or val (default test)")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="per generated response (default 128 with --preferences, 1280 with --benchmark ifeval)")
    ev.add_argument("--against", default=None,
                    help="another system's responses on the same entries: metrics side by side with a paired bootstrap")
    ev.add_argument("--against-label", default=None, help="name for --against in the report (default: its file name)")
    ev.add_argument("--agreement", nargs=2, default=None, metavar=("A.json", "B.json"), help="agreement of two score files")
    ev.add_argument("--run", default=None, help="run folder (for the loss plot in the report; with --benchmark: the model)")
    ev.add_argument("--benchmark", choices=["ifeval"], default=None,
                    help="ifeval: answer IFEval's 541 prompts with --run R or --model SPEC and score them with "
                         "lm-evaluation-harness's checkers (strict and loose, prompt and instruction level)")
    ev.add_argument("--model", default=None, help="with --benchmark: any model spec instead of --run")
    ev.add_argument("--prompt-style", default=None,
                    help="with --benchmark: how prompts are written (default: the run's, else the model's own template)")
    ev.add_argument("--with-base", action="store_true",
                    help="with --benchmark and --run: also answer with the run's starting model, shown beside it")
    ev.add_argument("--ifeval-data", default=None,
                    help="IFEval's input_data.jsonl (default: downloaded once from google-research and cached)")
    ev.add_argument("--limit", type=int, default=None, help="with --benchmark: only the first N prompts (a quick look)")
    ev.add_argument("--batch-size", type=int, default=32, help="with --benchmark: rows decoded at once (default 32); the next prompts join as rows end")
    ev.add_argument("--quantize", default="none",
                    help="with --benchmark: decoding weights, none (default: exact fp32), int8 or int4")
    ev.add_argument("--out", default=None, help="folder for evaluation.json and the report (default: beside the responses)")
    add_judge_options(ev)
    ev.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from instructkit.evaluate.evaluation import evaluate_file

    if args.benchmark:
        return _benchmark(args)
    if args.preferences:
        return _evaluate_preferences(args)
    if args.agreement:
        return _agreement(args)
    if not args.responses:
        raise UserError("evaluate needs --responses FILE (or --agreement A.json B.json)")
    responses = Path(args.responses)
    out_dir = Path(args.out) if args.out else responses.parent
    run_dir = Path(args.run) if args.run else (responses.parent if RunFolder(responses.parent).has_config() else None)
    result = evaluate_file(responses, out_dir=out_dir, judge=judge_config(args),
                           baseline_path=Path(args.baseline) if args.baseline else None,
                           compare_path=Path(args.compare) if args.compare else None,
                           against_path=Path(args.against) if args.against else None, against_label=args.against_label,
                           run_dir=run_dir)
    print_evaluation(result)
    print_report_files(out_dir)
    return judge_exit_status(result)


def _agreement(args: argparse.Namespace) -> int:
    from instructkit.evaluate.evaluation import agreement, load_scores

    first, second = (Path(p) for p in args.agreement)
    stats = agreement(load_scores(first), load_scores(second), (str(first), str(second)))
    print(f"Agreement between {first.name} and {second.name} (n={stats['n']}): means {stats['mean_a']:.2f} vs "
          f"{stats['mean_b']:.2f}; Pearson {stats['pearson']:.3f}, Spearman {stats['spearman']:.3f}, "
          f"Kendall tau-b {stats['kendall_tau_b']:.3f}")
    return 0


def _evaluate_preferences(args: argparse.Namespace) -> int:
    from instructkit.evaluate.preference_eval import evaluate_preferences

    positive("max-new-tokens", args.max_new_tokens)
    result = evaluate_preferences(RunFolder(args.preferences), data=args.data, split=args.split,
                                  max_new_tokens=args.max_new_tokens or 128, judge=judge_config(args),
                                  out_dir=Path(args.out) if args.out else None)
    reward, likelihood = result["implicit_reward"], result["likelihood_preference"]
    print(f"{result['pairs']} {result['split']} pairs: implicit-reward accuracy {reward['dpo']['accuracy']:.1%} "
          f"(mean margin {reward['dpo']['mean_margin']:.3f}); likelihood prefers chosen: SFT {likelihood['sft']:.1%}, "
          f"DPO {likelihood['dpo']:.1%}")
    for name in ("sft", "dpo"):
        scores = result["responses"][name]
        print(f"{name.upper():>3} responses vs chosen: ROUGE-L {scores['vs_chosen']['rouge_l']:.3f}, chrF "
              f"{scores['vs_chosen']['chrf']:.1f}; vs rejected: ROUGE-L {scores['vs_rejected']['rouge_l']:.3f}")
    out = Path(args.out) if args.out else Path(args.preferences)
    print(f"Report: {out / 'report-preferences.md'} and {out / 'report-preferences.html'}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from instructkit.decode.load import Ready, load_for_talk, prepare_for_decoding, prompt_style_for
    from instructkit.evaluate.ifeval import SCORE_LABELS, SCORES, default_prompts_file, evaluate_ifeval, load_prompts
    from instructkit.models.registry import load_model

    for name in ("max-new-tokens", "limit", "batch-size"):
        positive(name, getattr(args, name.replace("-", "_")))
    if args.with_base and not args.run:
        raise UserError("--with-base needs --run (the base is the run's starting model)")
    data_file = Path(args.ifeval_data) if args.ifeval_data else default_prompts_file()
    records = load_prompts(data_file, args.limit)
    decoding = {"quantize": args.quantize}
    ready = load_for_talk(run=args.run, model=args.model, prompt_style=args.prompt_style, strict_style=True,
                          command="evaluate --benchmark", **decoding)
    systems = {"fine-tuned" if ready.run is not None else "model": ready}
    if args.with_base:
        base = prepare_for_decoding(load_model(ready.run.config()["model"]), **decoding)
        systems["base"] = Ready(base, prompt_style_for(base, ready.run, args.prompt_style), None)
    if args.out:
        out_dir = Path(args.out)
    elif ready.run is not None:
        out_dir = ready.run.ifeval_dir
    else:
        raise UserError("--benchmark with --model needs --out FOLDER (with --run the results go into RUN_DIR/ifeval)")
    result = evaluate_ifeval(systems, records, out_dir, data_file=data_file, max_new_tokens=args.max_new_tokens or 1280,
                             batch_size=args.batch_size)
    for name, system in result["systems"].items():
        scores = ", ".join(f"{SCORE_LABELS[score]} {system['scores'][score]:.1%}" for score in SCORES)
        print(f"IFEval, {name} ({system['settings']['model']}, {result['prompts']} prompts): {scores}; "
              f"{system['looped']} ended by the repeat rule, {system['seconds']:.0f} s")
    print(f"Report: {out_dir / 'ifeval-report.md'} and {out_dir / 'ifeval-report.html'}; scores: {out_dir / 'ifeval.json'}")
    return 0
