"""The `instructkit` command: a thin table of subcommands over library functions.

User mistakes raise `UserError`; `main` prints them as one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from instructkit.errors import UserError
from instructkit.runs import RunFolder


def _add_data_options(parser: argparse.ArgumentParser, *, default_data: str | None = None) -> None:
    parser.add_argument(
        "--data",
        required=default_data is None,
        default=default_data,
        help="JSON/JSONL file, http(s) URL, or a named source: builtin[:N[:SEED]], chapter7, alpaca52k",
    )
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid records instead of stopping")
    parser.add_argument("--shuffle-seed", type=int, default=None, help="shuffle records before splitting")
    parser.add_argument("--prompt-style", default=None, help="alpaca (default for GPT-2), phi3, gemma")
    parser.add_argument("--mask-instructions", action="store_true", help="supervise only the response and end token")
    parser.add_argument("--max-length", type=int, default=None, help="truncate examples to N training positions")
    parser.add_argument("--batch-size", type=int, default=8)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"--{name} must be a positive integer, got {value}")


def cmd_data(args: argparse.Namespace) -> int:
    from instructkit.data.pipeline import encode_splits, length_stats, padding_shares, prepare_data, write_splits
    from instructkit.data.prompts import get_prompt_style
    from instructkit.models.tokenizer import load_tokenizer

    _positive("max-length", args.max_length)
    _positive("batch-size", args.batch_size)
    style = get_prompt_style(args.prompt_style or "alpaca")
    tokenizer = load_tokenizer(args.tokenizer)
    data = prepare_data(args.data, skip_invalid=args.skip_invalid, shuffle_seed=args.shuffle_seed)
    encoded = encode_splits(
        data, style, tokenizer, mask_instructions=args.mask_instructions, max_length=args.max_length
    )

    loaded, splits = data.loaded, data.splits
    print(f"Loaded {len(loaded.records):,} records from {loaded.path}")
    if loaded.skipped:
        print(f"Skipped {loaded.skipped} invalid records (--skip-invalid):")
        for problem in loaded.problems[:10]:
            print(f"  {problem}")
    families = {}
    for record in loaded.records:
        if "task" in record:
            families[record["task"]] = families.get(record["task"], 0) + 1
    if families:
        print("Task families: " + ", ".join(f"{name} {count}" for name, count in sorted(families.items())))
    order = "shuffled with seed " + str(args.shuffle_seed) if args.shuffle_seed is not None else "file order"
    print(f"Split ({order}): train {len(splits.train):,} | test {len(splits.test):,} | val {len(splits.val):,}")
    masking = "response and end token only" if args.mask_instructions else "all tokens (the chapter's default)"
    print(f"Prompt style: {style.name} | tokenizer: {tokenizer.name} | supervised: {masking}")
    print()
    print("Tokens per example (training positions: prompt + response, as the model reads them)")
    print(f"{'split':<6} {'examples':>8} {'min':>5} {'median':>7} {'p95':>5} {'max':>5} {'supervised':>11}")
    for name, (examples, _) in encoded.items():
        stats = length_stats(examples)
        if stats is None:
            print(f"{name:<6} {0:>8}")
            continue
        print(
            f"{name:<6} {stats.count:>8,} {stats.minimum:>5} {stats.median:>7g} {stats.p95:>5g} "
            f"{stats.maximum:>5} {stats.supervised:>11,}"
        )
    print()
    reports = [report for _, report in encoded.values()]
    not_prefix = sum(report.prompt_not_prefix for report in reports)
    print(f"Prompt not a token prefix of prompt + response: {not_prefix} of {sum(r.examples for r in reports):,}")
    if args.max_length is not None:
        truncated = sum(report.truncated for report in reports)
        empty = sum(report.nothing_supervised for report in reports)
        print(
            f"Truncated to {args.max_length} positions: {truncated} examples lost their end token, "
            f"{empty} kept no supervised token"
        )
    train_examples = encoded["train"][0]
    if len(train_examples) >= args.batch_size:
        shares = padding_shares(train_examples, args.batch_size)
        print(
            f"Padding share of train batches (batch {args.batch_size}): "
            f"chapter batching {shares['chapter']:.1%} | length-grouped {shares['length_grouped']:.1%}"
        )
    if args.out:
        for path in write_splits(splits, Path(args.out)):
            print(f"Wrote {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from instructkit.data.prompts import get_prompt_style
    from instructkit.data.tokenize import end_token_id
    from instructkit.generate import Sampling, generate, stream_text
    from instructkit.models.registry import load_model

    _positive("max-new-tokens", args.max_new_tokens)
    if args.top_k is not None:
        _positive("top-k", args.top_k)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    stop_ids = {tokenizer.eos_id}
    text = args.prompt
    if args.prompt_style:
        style = get_prompt_style(args.prompt_style)
        text = style.prompt({"instruction": args.prompt, "input": args.input or ""})
        stop_ids.add(end_token_id(style, tokenizer))
    options = dict(
        max_new_tokens=args.max_new_tokens,
        stop_ids=sorted(stop_ids),
        stop_strings=args.stop or (),
        sampling=Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
    )
    prompt_ids = tokenizer.encode(text)
    if args.stream:
        if not args.prompt_style:
            print(args.prompt, end="", flush=True)
        for piece in stream_text(loaded.model, tokenizer, prompt_ids, **options):
            print(piece, end="", flush=True)
        print()
        return 0
    result = generate(loaded.model, tokenizer, [prompt_ids], **options)[0]
    print(result.text if args.prompt_style else args.prompt + result.text)
    return 0


# (option, type, help) for every TrainConfig field the finetune command exposes.
TRAIN_OPTIONS = [
    ("epochs", int, "passes over the training split (default 2)"),
    ("max-steps", int, "stop after this many optimizer steps"),
    ("batch-size", int, "examples per micro-batch (default 8)"),
    ("grad-accum", int, "micro-batches per optimizer step (default 1); batch B with accumulation A puts the same "
                        "examples into each step as batch B*A"),
    ("lr", float, "peak learning rate (default 5e-5)"),
    ("weight-decay", float, "AdamW weight decay on matrices (default 0.1)"),
    ("warmup", int, "linear warm-up steps (default 0)"),
    ("schedule", str, "constant (default) or cosine"),
    ("clip", float, "clip the gradient norm to this value"),
    ("max-length", int, "truncate examples to N training positions"),
    ("prompt-style", str, "alpaca, phi3 or gemma (default: the model's own)"),
    ("lora-rank", int, "LoRA rank; 0 = full fine-tuning (default)"),
    ("lora-alpha", float, "LoRA alpha (default 16); the update is scaled by alpha/rank (the book's exercise 7.4 "
                          "scales by alpha alone: its alpha a at rank r is our a*r)"),
    ("eval-every", int, "optimizer steps between evaluations (default 5)"),
    ("eval-batches", int, "train and validation batches per evaluation (default 5)"),
    ("early-stop", int, "stop after N evaluations without a better validation loss"),
    ("seed", int, "seed for initialisation and data order (default 123)"),
    ("save-every", int, "optimizer steps between resumable checkpoints (default 50)"),
    ("batching", str, "grouped (length-grouped, default) or chapter (the chapter's shuffled order)"),
    ("shuffle-seed", int, "shuffle records before splitting"),
    ("threads", int, "torch CPU threads"),
]


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    for option, kind, text in TRAIN_OPTIONS:
        parser.add_argument(f"--{option}", type=kind, default=None, help=text)
    parser.add_argument("--lora-targets", default=None, help="comma list: attention, mlp, or layer names")
    parser.add_argument("--mask-instructions", action="store_true", default=None, help="supervise only the response and end token")
    parser.add_argument("--freeze-embedding", action="store_true", default=None, help="freeze the (tied) token embedding")
    parser.add_argument("--skip-invalid", action="store_true", default=None, help="drop invalid records instead of stopping")
    parser.add_argument("--no-sample", dest="sample_prompt", action="store_false", default=None, help="skip the per-epoch sample")


def _train_config(args: argparse.Namespace, base):
    """The TrainConfig of `base` with every option given on the command line applied."""
    values = base.to_dict()
    for option, _, _ in TRAIN_OPTIONS:
        value = getattr(args, option.replace("-", "_"))
        if value is not None:
            values[option.replace("-", "_")] = value
    for name in ("mask_instructions", "freeze_embedding", "skip_invalid", "sample_prompt"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.lora_targets:
        values["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    for name in ("model", "data", "out"):
        if getattr(args, name, None):
            values[name] = getattr(args, name)
    from instructkit.train.config import TrainConfig

    return TrainConfig.from_dict(values).validate()


def cmd_finetune(args: argparse.Namespace) -> int:
    from instructkit.train.config import TrainConfig
    from instructkit.train.finetune import finetune, load_run_config

    if args.resume:
        # The saved config, with any option given here applied: finetune refuses a difference.
        config = _train_config(args, load_run_config(RunFolder(args.resume)))
        config.out = args.resume
        finetune(config, resume=True)
        return 0
    if not args.data or not args.out:
        raise UserError("finetune needs --data and --out (or --resume RUN_DIR)")
    config = _train_config(args, TrainConfig())
    print("Config:", json.dumps(config.to_dict()))
    finetune(config)
    return 0


def cmd_respond(args: argparse.Namespace) -> int:
    from instructkit.data.pipeline import prepare_data
    from instructkit.models.registry import load_model
    from instructkit.data.fewshot import BASE_MODEL_STYLE
    from instructkit.respond import respond, style_for

    _positive("max-new-tokens", args.max_new_tokens)
    _positive("batch-size", args.batch_size)
    if args.few_shot < 0:
        raise UserError(f"--few-shot must be 0 or more, got {args.few_shot}")
    if bool(args.run) == bool(args.model):
        raise UserError("respond needs exactly one of --run RUN_DIR or --model M")
    run = RunFolder(args.run).require_finished() if args.run else None
    data = args.data or (run.config()["data"] if run is not None and run.has_config() else None)
    if data is None:
        raise UserError("respond needs --data (or a --run whose config names its data)")
    loaded = load_model(str(run.path) if run else args.model)
    style = style_for(loaded, run, args.prompt_style or (BASE_MODEL_STYLE if args.few_shot else None))
    prepared = prepare_data(data, skip_invalid=args.skip_invalid, shuffle_seed=args.shuffle_seed)
    entries = prepared.splits.by_name(args.split)
    out = Path(args.out) if args.out else (run.responses_file(args.split) if run else Path(f"{args.split}-responses.json"))
    started = time.perf_counter()
    respond(loaded, style, entries, out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            shots=args.few_shot, shot_pool=prepared.splits.train)
    print(f"Wrote {len(entries)} responses to {out} (and {out.with_suffix('.jsonl')}) in {time.perf_counter() - started:.0f} s")
    return 0


def _judge_config(args: argparse.Namespace):
    import os

    from instructkit.evaluate.judge import PROMPTS, JudgeConfig

    if not args.judge_url:
        return None
    if not args.judge_model:
        raise UserError("--judge-url needs --judge-model (e.g. llama3)")
    if args.judge_api not in ("openai", "ollama"):
        raise UserError(f"--judge-api must be openai or ollama, got {args.judge_api!r}")
    if args.judge_prompt not in PROMPTS:
        raise UserError(f"--judge-prompt must be one of {', '.join(PROMPTS)}")
    key = None
    if args.judge_api_key_env:
        key = os.environ.get(args.judge_api_key_env)
        if not key:
            raise UserError(f"--judge-api-key-env {args.judge_api_key_env}: that environment variable is not set")
    return JudgeConfig(url=args.judge_url, model=args.judge_model, api=args.judge_api, prompt=args.judge_prompt,
                       timeout=args.judge_timeout, retries=args.judge_retries, concurrency=args.judge_concurrency,
                       api_key=key)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from instructkit.evaluate.evaluation import agreement, evaluate_file, load_scores

    if args.agreement:
        first, second = (Path(p) for p in args.agreement)
        stats = agreement(load_scores(first), load_scores(second), (str(first), str(second)))
        print(f"Agreement between {first.name} and {second.name} (n={stats['n']}): means {stats['mean_a']:.2f} vs "
              f"{stats['mean_b']:.2f}; Pearson {stats['pearson']:.3f}, Spearman {stats['spearman']:.3f}, "
              f"Kendall tau-b {stats['kendall_tau_b']:.3f}")
        return 0
    if not args.responses:
        raise UserError("evaluate needs --responses FILE (or --agreement A.json B.json)")
    responses = Path(args.responses)
    out_dir = Path(args.out) if args.out else responses.parent
    run_dir = Path(args.run) if args.run else (responses.parent if RunFolder(responses.parent).has_config() else None)
    result = evaluate_file(responses, out_dir=out_dir, judge=_judge_config(args),
                           baseline_path=Path(args.baseline) if args.baseline else None,
                           compare_path=Path(args.compare) if args.compare else None, run_dir=run_dir)
    _print_evaluation(result)
    markdown, html_file = RunFolder(out_dir).report_files
    print(f"Report: {markdown} and {html_file}")
    return 0


def _print_evaluation(result: dict) -> None:
    metrics = result["metrics"]
    base = result.get("baseline", {}).get("metrics")
    print(f"{'metric':<20} {'model':>10}" + (f" {'base':>10}" if base else ""))
    for key in ("exact_match", "normalized_match", "rouge_l", "chrf", "bleu", "response_words_mean"):
        print(f"{key:<20} {metrics[key]:>10.3f}" + (f" {base[key]:>10.3f}" if base else ""))
    if "checks" in result:
        base_checks = result.get("baseline", {}).get("checks")
        base_text = f" ({result['baseline']['label']}: {base_checks['accuracy']:.1%})" if base_checks else ""
        print(f"Exact-check accuracy: {result['checks']['accuracy']:.1%} over {result['checks']['n']} entries{base_text}")
    if "judge" in result:
        judge = result["judge"]
        print(f"Judge mean {judge['mean']:.2f} (95% CI {judge['ci95'][0]:.2f}-{judge['ci95'][1]:.2f}), "
              f"{judge['scored']} scored, {len(judge['unparsed'])} unparsed, {len(judge['failed'])} failed")


def cmd_run(args: argparse.Namespace) -> int:
    """The main job (main_job.py holds the recipe)."""
    from instructkit.main_job import MainJob, run_main_job
    from instructkit.runs import default_run_dir

    job = MainJob(model=args.model, data=args.data, out=args.out or default_run_dir(args.data), seed=args.seed,
                  epochs=args.epochs, lr=args.lr, warmup=args.warmup, schedule=args.schedule, max_steps=args.max_steps,
                  max_new_tokens=args.max_new_tokens, base_max_new_tokens=args.base_max_new_tokens,
                  base_shots=args.base_shots, judge=_judge_config(args))
    _positive("max-new-tokens", job.max_new_tokens)
    _positive("base-max-new-tokens", job.base_max_new_tokens)
    if job.base_shots < 0:
        raise UserError(f"--base-shots must be 0 or more, got {job.base_shots}")
    result = run_main_job(job)
    _print_evaluation(result)
    markdown, html_file = RunFolder(job.out).report_files
    print(f"Report: {markdown} and {html_file}")
    print(f"Wall time: {result['wall_seconds']:.0f} s")
    return 0


def _add_judge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge-url", default=None, help="judge server, e.g. http://localhost:11434 (Ollama)")
    parser.add_argument("--judge-model", default=None, help="judge model name, e.g. llama3")
    parser.add_argument("--judge-api", default="ollama", help="ollama (native /api/chat, default) or openai (/v1/chat/completions)")
    parser.add_argument("--judge-prompt", default="chapter", help="chapter (0-100, default) or rubric (1-5)")
    parser.add_argument("--judge-timeout", type=float, default=60.0)
    parser.add_argument("--judge-retries", type=int, default=3)
    parser.add_argument("--judge-concurrency", type=int, default=4)
    parser.add_argument("--judge-api-key-env", default=None, help="environment variable holding an API key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructkit",
        description="Fine-tune pretrained causal language models to follow instructions, then measure them.",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands.required = True

    data = subcommands.add_parser("data", help="load, validate, split and tokenize a dataset; print statistics")
    _add_data_options(data)
    data.add_argument("--tokenizer", default="gpt2", help="tokenizer to measure lengths with (default: gpt2)")
    data.add_argument("--out", default=None, help="write train.json, test.json and val.json into this folder")
    data.set_defaults(handler=cmd_data)

    gen = subcommands.add_parser("generate", help="complete a prompt with a model")
    gen.add_argument("--model", default="gemma-3-270m", help="preset, folder, .gguf, .pth or HF repo id (default: gemma-3-270m)")
    gen.add_argument("--prompt", required=True, help="the text to continue (or the instruction, with --prompt-style)")
    gen.add_argument("--input", default=None, help="optional input field, with --prompt-style")
    gen.add_argument("--prompt-style", default=None, help="wrap the prompt as an instruction: alpaca, phi3, gemma")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.set_defaults(handler=cmd_generate)

    tune = subcommands.add_parser("finetune", help="fine-tune a model on instruction data (full or LoRA)")
    tune.add_argument("--model", default=None, help="preset, folder, .gguf, .pth or HF repo id (default gemma-3-270m)")
    tune.add_argument("--data", default=None, help="JSON/JSONL file, URL, or chapter7 / alpaca52k")
    tune.add_argument("--out", default=None, help="run folder to create")
    tune.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    _add_train_options(tune)
    tune.set_defaults(handler=cmd_finetune)

    resp = subcommands.add_parser("respond", help="generate responses for a data split (resumable)")
    resp.add_argument("--run", default=None, help="a fine-tuning run folder")
    resp.add_argument("--model", default=None, help="or any model spec (e.g. gemma-3-270m for the base model)")
    resp.add_argument("--data", default=None, help="data source (default: the run's)")
    resp.add_argument("--split", default="test", help="train, test or val (default test)")
    resp.add_argument("--out", default=None, help="responses .json (default: RUN_DIR/SPLIT-responses.json)")
    resp.add_argument("--prompt-style", default=None)
    resp.add_argument("--max-new-tokens", type=int, default=256)
    resp.add_argument("--batch-size", type=int, default=128, help="prompts decoded together (default 128)")
    resp.add_argument("--skip-invalid", action="store_true")
    resp.add_argument("--shuffle-seed", type=int, default=None)
    resp.add_argument("--few-shot", type=int, default=0,
                      help="K solved training examples before each question, answer = first line (for base "
                           "models; in the alpaca style unless --prompt-style is given)")
    resp.set_defaults(handler=cmd_respond)

    ev = subcommands.add_parser("evaluate", help="score responses: offline metrics, optional LLM judge, report")
    ev.add_argument("--responses", default=None, help="responses file (the chapter's format)")
    ev.add_argument("--baseline", default=None, help="responses of a base model, shown side by side")
    ev.add_argument("--compare", default=None, help="another responses file to judge pairwise against")
    ev.add_argument("--agreement", nargs=2, default=None, metavar=("A.json", "B.json"), help="agreement of two score files")
    ev.add_argument("--run", default=None, help="run folder (for the loss plot in the report)")
    ev.add_argument("--out", default=None, help="folder for evaluation.json and the report (default: beside the responses)")
    _add_judge_options(ev)
    ev.set_defaults(handler=cmd_evaluate)

    run = subcommands.add_parser("run", help="the main job: fine-tune, respond on the test split, evaluate, report")
    run.add_argument("--model", default="gemma-3-270m")
    run.add_argument("--data", default="builtin", help="default: the built-in verifiable dataset (offline)")
    run.add_argument("--out", default=None, help="run folder (default: runs/ and the data's name, e.g. runs/builtin)")
    run.add_argument("--seed", type=int, default=123, help="seed of every random draw (default 123)")
    run.add_argument("--epochs", type=int, default=1)
    run.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    run.add_argument("--warmup", type=int, default=10, help="linear warm-up steps before the cosine decay")
    run.add_argument("--schedule", default="cosine", help="constant or cosine (default)")
    run.add_argument("--max-steps", type=int, default=None)
    run.add_argument("--max-new-tokens", type=int, default=256)
    run.add_argument("--base-max-new-tokens", type=int, default=64, help="the base model rarely stops; cap it")
    run.add_argument("--base-shots", type=int, default=3,
                     help="solved training examples before each question for the base model (default 3; its answer is "
                          "the first line it writes)")
    _add_judge_options(run)
    run.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"instructkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instructkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
