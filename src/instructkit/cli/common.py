"""Options and helpers that several command groups share: the split of a dataset, device and
precision, beam search, the LLM judge, and the printed evaluation table."""

from __future__ import annotations

import argparse
import os
import sys

from instructkit.errors import UserError
from instructkit.runs import RunFolder


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (no usage block; --help has it), exit 2.
    Subcommand parsers inherit the class (add_subparsers uses the parent's type)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _argument_type(check, wanted: str, convert=int):
    """An argparse `type=` that converts and checks a value, so every command refuses it with the
    same one line: "argument --port: must be a port from 0 to 65535, got 99999"."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


def _share(text: str) -> float:
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


PORT = _argument_type(lambda v: 0 <= v <= 65535, "a port from 0 to 65535 (0 picks a free one)")
POSITIVE_INT = _argument_type(lambda v: v > 0, "a positive integer")
NON_NEGATIVE_INT = _argument_type(lambda v: v >= 0, "0 or a positive integer")
POSITIVE_FLOAT = _argument_type(lambda v: 0 < v < float("inf"), "a positive number", float)
NON_NEGATIVE_FLOAT = _argument_type(lambda v: 0 <= v < float("inf"), "0 or a positive number", float)
SHARE = _argument_type(lambda v: 0 <= v <= 1, "a share from 0 to 1 (or 0% to 100%)", _share)


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


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_run_or_model(parser: argparse.ArgumentParser, run_help: str, model_help: str) -> None:
    """--run RUN_DIR or --model SPEC (decode/load.py's source_of reads them: exactly one)."""
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
    parser.add_argument("--judge-api", default="ollama", choices=("ollama", "openai"),
                        help="ollama (native /api/chat, default) or openai (/v1/chat/completions)")
    parser.add_argument("--judge-prompt", default="chapter", choices=("chapter", "rubric"),
                        help="chapter (0-100, default) or rubric (1-5)")
    parser.add_argument("--judge-timeout", type=POSITIVE_FLOAT, default=60.0,
                        help="seconds one judge request may take in all, however the server streams it (default 60)")
    parser.add_argument("--judge-retries", type=NON_NEGATIVE_INT, default=3,
                        help="retries of a request that timed out, failed with 5xx or 429, or lost its connection (default 3)")
    parser.add_argument("--judge-concurrency", type=POSITIVE_INT, default=4, help="requests in flight (default 4)")
    parser.add_argument("--judge-max-failures", type=SHARE, default=0.1,
                        help="share of entries the judge may leave unscored (failed or not a score) with a warning; "
                             "more, or none scored, fails the evaluation with exit 1 (default 0.1, i.e. 10%%)")
    parser.add_argument("--judge-api-key-env", default=None, help="environment variable holding an API key")


def judge_config(args: argparse.Namespace):
    """The judge the --judge-* options describe, or None without --judge-url."""
    from instructkit.evaluate.judge import JudgeConfig

    if not args.judge_url:
        return None
    if not args.judge_model:
        raise UserError("--judge-url needs --judge-model (e.g. llama3)")
    key = env_secret("--judge-api-key-env", args.judge_api_key_env)
    return JudgeConfig(url=args.judge_url, model=args.judge_model, api=args.judge_api, prompt=args.judge_prompt,
                       timeout=args.judge_timeout, retries=args.judge_retries, concurrency=args.judge_concurrency,
                       max_failures=args.judge_max_failures, api_key=key)


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
        mean = ("Judge failed, no mean" if judge["status"] == "failed" else
                f"Judge mean {judge['mean']:.2f} (95% CI {judge['ci95'][0]:.2f}-{judge['ci95'][1]:.2f})")
        print(f"{mean}, {judge['scored']} scored, {len(judge['unparsed'])} unparsed, {len(judge['failed'])} failed")


def judge_exit_status(result: dict) -> int:
    """1 when the judge failed (the report says so), after a one-line error; a warning when it
    left some entries unscored within --judge-max-failures."""
    from instructkit.evaluate.evaluation import judge_problem

    problem = judge_problem(result["judge"]) if "judge" in result else None
    if problem is None:
        return 0
    failed = result["judge"]["status"] == "failed"
    print(f"instructkit: {'error' if failed else 'warning'}: {problem}", file=sys.stderr)
    return 1 if failed else 0


def print_report_files(folder) -> None:
    markdown, html_file = RunFolder(folder).report_files
    print(f"Report: {markdown} and {html_file}")
