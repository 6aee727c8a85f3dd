"""`instructkit data`: load, validate, split and tokenize a dataset; print its statistics."""

from __future__ import annotations

import argparse
from pathlib import Path

from instructkit.cli.common import add_split_options, positive


def register(subcommands) -> None:
    data = subcommands.add_parser("data", help="load, validate, split and tokenize a dataset; print statistics")
    data.add_argument("--data", required=True,
                      help="JSON/JSONL file, http(s) URL, or a named source: builtin[:N[:SEED]], chapter7, alpaca52k")
    add_split_options(data)
    data.add_argument("--format", default="auto", help="alpaca, messages (OpenAI), sharegpt, or auto (from the first record)")
    data.add_argument("--columns", default=None, help="other field names of a conversation file: messages=NAME,role=NAME,content=NAME")
    data.add_argument("--model", default=None, help="measure with this model's tokenizer and chat template (any --model spec)")
    data.add_argument("--prompt-style", default=None,
                      help="model (its own chat template), alpaca (default for GPT-2), phi3, gemma, chatml")
    data.add_argument("--mask-instructions", action="store_true", help="supervise only the response and end token")
    data.add_argument("--train-on", default=None, choices=("assistant", "all"),
                      help="assistant (every answer and its end token) or all; default: assistant for conversations")
    data.add_argument("--show-mask", action="store_true", help="print one rendered training example with its supervised "
                                                                 "spans marked [[like this]]")
    data.add_argument("--max-length", type=int, default=None, help="truncate examples to N training positions")
    data.add_argument("--batch-size", type=int, default=8)
    data.add_argument("--tokenizer", default="gpt2", help="tokenizer to measure lengths with (default: gpt2)")
    data.add_argument("--out", default=None, help="write train.json, test.json and val.json into this folder")
    data.set_defaults(handler=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from instructkit.data.pipeline import encode_splits, prepare_data, supervision_words, uses_rendering, write_splits
    from instructkit.data.prompts import get_prompt_style
    from instructkit.models.tokenizer import load_tokenizer

    positive("max-length", args.max_length)
    positive("batch-size", args.batch_size)
    data = prepare_data(args.data, skip_invalid=args.skip_invalid, shuffle_seed=args.shuffle_seed,
                        group_near_duplicates=args.group_near_duplicates, fmt=args.format, columns=args.columns)
    if args.model:
        from instructkit.data.prompts import resolve_prompt_style
        from instructkit.models.registry import load_model

        loaded = load_model(args.model)
        tokenizer = loaded.tokenizer
        style = resolve_prompt_style(args.prompt_style or loaded.default_prompt_style, loaded)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
        style = get_prompt_style(args.prompt_style or "alpaca")
    encoded = encode_splits(data, style, tokenizer, mask_instructions=args.mask_instructions, max_length=args.max_length,
                            train_on=args.train_on, skip_invalid=args.skip_invalid)
    _print_records(args, data)
    rendered = uses_rendering(data, style, args.train_on)
    masking = supervision_words(data, style, args.train_on, args.mask_instructions)
    print(f"Format: {data.loaded.format} | prompt style: {style.name} | tokenizer: {tokenizer.name} | supervised: {masking}")
    print()
    _print_lengths(encoded)
    print()
    if rendered:
        _print_coverage(args, encoded)
        if args.show_mask and data.splits.train:
            _print_mask(data.splits.train[0], style, tokenizer)
    else:
        _print_truncation_and_padding(args, encoded)
    if args.out:
        for path in write_splits(data.splits, Path(args.out)):
            print(f"Wrote {path}")
    return 0


def _print_records(args: argparse.Namespace, data) -> None:
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
    if args.group_near_duplicates:
        order += ", near-duplicate prompts grouped"
    print(f"Split ({order}): train {len(splits.train):,} | test {len(splits.test):,} | val {len(splits.val):,}")


def _print_lengths(encoded: dict) -> None:
    from instructkit.data.pipeline import length_stats

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


def _print_coverage(args: argparse.Namespace, encoded: dict) -> None:
    """Mask coverage per split: answer tokens per record, records cut and dropped."""
    from instructkit.data.pipeline import padding_shares

    print("Supervised (answer) tokens per record")
    print(f"{'split':<6} {'records':>8} {'min':>5} {'median':>7} {'max':>5} {'truncated':>10} {'dropped':>8}")
    for name, (_, report) in encoded.items():
        coverage = report.coverage()
        print(f"{name:<6} {report.records:>8,} {coverage['min']:>5} {coverage['median']:>7} {coverage['max']:>5} "
              f"{report.truncated:>10} {report.skipped:>8}")
    per_turn = sum(report.per_turn for _, report in encoded.values())
    mismatched = sum(report.header_mismatches for _, report in encoded.values())
    if per_turn:
        print(f"{per_turn} records trained turn by turn: the template renders earlier turns differently once later "
              "ones exist (not prefix-stable), so each answer is an example of its own")
    if mismatched:
        print(f"Note: for {mismatched} answers the template's generation prompt ends in whitespace its rendering of the "
              "answer lacks; the model is trained as rendered")
    train_examples = encoded["train"][0]
    if len(train_examples) >= args.batch_size:
        shares = padding_shares(train_examples, args.batch_size)
        print(f"Padding share of train batches (batch {args.batch_size}): chapter batching {shares['chapter']:.1%} | "
              f"length-grouped {shares['length_grouped']:.1%}")


def _print_mask(record: dict, style, tokenizer) -> None:
    """The first training record rendered, its supervised tokens inside [[ ]]."""
    from instructkit.data.rendering import Renderer, encode_conversations, marked_text

    examples, _ = encode_conversations([record], Renderer(tokenizer, style=style), skip_invalid=True)
    if examples:
        print("\nThe first training record as the model reads it, supervised tokens in [[ ]]:")
        print(marked_text(examples[0], tokenizer))


def _print_truncation_and_padding(args: argparse.Namespace, encoded: dict) -> None:
    from instructkit.data.pipeline import padding_shares

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
