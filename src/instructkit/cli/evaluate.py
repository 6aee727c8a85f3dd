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
    ev.add_argument("--max-new-tokens", type=int, default=128, help="with --preferences: per generated response")
    ev.add_argument("--against", default=None,
                    help="another system's responses on the same entries: metrics side by side with a paired bootstrap")
    ev.add_argument("--against-label", default=None, help="name for --against in the report (default: its file name)")
    ev.add_argument("--agreement", nargs=2, default=None, metavar=("A.json", "B.json"), help="agreement of two score files")
    ev.add_argument("--run", default=None, help="run folder (for the loss plot in the report)")
    ev.add_argument("--out", default=None, help="folder for evaluation.json and the report (default: beside the responses)")
    add_judge_options(ev)
    ev.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from instructkit.evaluate.evaluation import evaluate_file

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
                                  max_new_tokens=args.max_new_tokens, judge=judge_config(args),
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
