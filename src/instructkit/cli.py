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


def _add_data_options(parser: argparse.ArgumentParser, *, default_data: str | None = None) -> None:
    parser.add_argument(
        "--data",
        required=default_data is None,
        default=default_data,
        help="JSON/JSONL file, http(s) URL, or a named source: chapter7, alpaca52k",
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
    ("grad-accum", int, "micro-batches per optimizer step (default 1)"),
    ("lr", float, "peak learning rate (default 5e-5)"),
    ("weight-decay", float, "AdamW weight decay on matrices (default 0.1)"),
    ("warmup", int, "linear warm-up steps (default 0)"),
    ("schedule", str, "constant (default) or cosine"),
    ("clip", float, "clip the gradient norm to this value"),
    ("max-length", int, "truncate examples to N training positions"),
    ("prompt-style", str, "alpaca, phi3 or gemma (default: the model's own)"),
    ("lora-rank", int, "LoRA rank; 0 = full fine-tuning (default)"),
    ("lora-alpha", float, "LoRA alpha (default 16)"),
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


def _train_config(args: argparse.Namespace, base: "TrainConfig") -> "TrainConfig":
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
        config = load_run_config(Path(args.resume))
        config.out = args.resume
        finetune(config, resume=True)
        return 0
    if not args.data or not args.out:
        raise UserError("finetune needs --data and --out (or --resume RUN_DIR)")
    config = _train_config(args, TrainConfig())
    print("Config:", json.dumps(config.to_dict()))
    finetune(config)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    args.tokenizer = "gpt2"
    args.out = str(Path(args.out) / "data")
    status = cmd_data(args)
    print()
    print(
        "instructkit run: stopping after data preparation. Fine-tuning, responses and evaluation "
        "are not part of this version yet."
    )
    print(f"Wall time: {time.perf_counter() - started:.1f} s")
    return status


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
    tune.add_argument("--model", default="gemma-3-270m", help="preset, folder, .gguf, .pth or HF repo id")
    tune.add_argument("--data", default=None, help="JSON/JSONL file, URL, or chapter7 / alpaca52k")
    tune.add_argument("--out", default=None, help="run folder to create")
    tune.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    _add_train_options(tune)
    tune.set_defaults(handler=cmd_finetune)

    run = subcommands.add_parser("run", help="the main job: fine-tune, respond on the test split, evaluate, report")
    _add_data_options(run, default_data="chapter7")
    run.add_argument("--out", default="runs/main", help="run folder")
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
