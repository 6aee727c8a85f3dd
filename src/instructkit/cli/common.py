"""Options and helpers that several command groups share: the split of a dataset, device and
precision, beam search, the LLM judge, and the printed evaluation table."""

from __future__ import annotations

import argparse
import os

from instructkit.errors import UserError
from instructkit.runs import RunFolder


def positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"--{name} must be a positive integer, got {value}")


def env_secret(flag: str, name: str | None) -> str | None:
    """The value of the environment variable an --...-env flag names (None when no flag is given)."""
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise UserError(f"{flag} {name}: that environment variable is not set")
    return value


def run_or_model(args: argparse.Namespace) -> RunFolder | None:
    """The finished run folder of --run, or None with --model: exactly one of them must be given."""
    if bool(getattr(args, "run", None)) == bool(getattr(args, "model", None)):
        raise UserError(f"{args.command} needs exactly one of --run RUN_DIR or --model SPEC")
    return RunFolder(args.run).require_finished() if args.run else None


def add_run_or_model(parser: argparse.ArgumentParser, run_help: str, model_help: str) -> None:
    """--run RUN_DIR or --model SPEC (run_or_model reads them)."""
    parser.add_argument("--run", default=None, help=run_help)
    parser.add_argument("--model", default=None, help=model_help)


def add_split_options(parser: argparse.ArgumentParser, *, default_text: str = "") -> None:
    """How records are read and split (as finetune splits them)."""
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid records instead of stopping")
    parser.add_argument("--shuffle-seed", type=int, default=None, help=f"shuffle records before splitting{default_text}")
    parser.add_argument("--group-near-duplicates", action="store_true",
                        help="keep near-duplicate prompts on one side of the split (no test prompt with a twin in "
                             f"training){default_text}")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, default), cpu or cuda")
    parser.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 (CUDA only)")


def add_beam_options(parser: argparse.ArgumentParser, default: int | None, default_text: str) -> None:
    parser.add_argument("--beams", type=int, default=default, help=f"beam search with this many beams (default {default_text})")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: a finished beam scores its summed log-probability / length ** this "
                             "(default 1.0; transformers' meaning)")


def add_judge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge-url", default=None, help="judge server, e.g. http://localhost:11434 (Ollama)")
    parser.add_argument("--judge-model", default=None, help="judge model name, e.g. llama3")
    parser.add_argument("--judge-api", default="ollama", help="ollama (native /api/chat, default) or openai (/v1/chat/completions)")
    parser.add_argument("--judge-prompt", default="chapter", help="chapter (0-100, default) or rubric (1-5)")
    parser.add_argument("--judge-timeout", type=float, default=60.0)
    parser.add_argument("--judge-retries", type=int, default=3)
    parser.add_argument("--judge-concurrency", type=int, default=4)
    parser.add_argument("--judge-api-key-env", default=None, help="environment variable holding an API key")


def judge_config(args: argparse.Namespace):
    """The judge the --judge-* options describe, or None without --judge-url."""
    from instructkit.evaluate.judge import PROMPTS, JudgeConfig

    if not args.judge_url:
        return None
    if not args.judge_model:
        raise UserError("--judge-url needs --judge-model (e.g. llama3)")
    if args.judge_api not in ("openai", "ollama"):
        raise UserError(f"--judge-api must be openai or ollama, got {args.judge_api!r}")
    if args.judge_prompt not in PROMPTS:
        raise UserError(f"--judge-prompt must be one of {', '.join(PROMPTS)}")
    key = env_secret("--judge-api-key-env", args.judge_api_key_env)
    return JudgeConfig(url=args.judge_url, model=args.judge_model, api=args.judge_api, prompt=args.judge_prompt,
                       timeout=args.judge_timeout, retries=args.judge_retries, concurrency=args.judge_concurrency,
                       api_key=key)


def print_evaluation(result: dict) -> None:
    metrics = result["metrics"]
    base = result.get("baseline", {}).get("metrics")
    print(f"{'metric':<20} {'model':>10}" + (f" {'base':>10}" if base else ""))
    for key in ("exact_match", "normalized_match", "rouge_l", "chrf", "bleu", "response_words_mean"):
        print(f"{key:<20} {metrics[key]:>10.3f}" + (f" {base[key]:>10.3f}" if base else ""))
    if "checks" in result:
        base_checks = result.get("baseline", {}).get("checks")
        base_text = f" ({result['baseline']['label']}: {base_checks['accuracy']:.1%})" if base_checks else ""
        print(f"Exact-check accuracy: {result['checks']['accuracy']:.1%} over {result['checks']['n']} entries{base_text}")
    if "against" in result:
        against = result["against"]
        for name, value in against["metrics"].items():
            low, high = value["ci95"]
            print(f"{name:<8} ours {value['ours']:.3f} vs {against['label']} {value['other']:.3f}: "
                  f"{value['difference']:+.3f} (95% CI {low:+.3f} to {high:+.3f})")
        print(f"Per item (ROUGE-L): {against['wins']} better, {against['ties']} equal, {against['losses']} worse")
    if "judge" in result:
        judge = result["judge"]
        print(f"Judge mean {judge['mean']:.2f} (95% CI {judge['ci95'][0]:.2f}-{judge['ci95'][1]:.2f}), "
              f"{judge['scored']} scored, {len(judge['unparsed'])} unparsed, {len(judge['failed'])} failed")


def print_report_files(folder) -> None:
    markdown, html_file = RunFolder(folder).report_files
    print(f"Report: {markdown} and {html_file}")
