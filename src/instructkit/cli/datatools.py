"""Dataset tools: dedup (exact and near-duplicate records), leakage (test records that are
training records) and synth (new instruction data from a served model)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from instructkit.cli.common import add_split_options, env_secret
from instructkit.errors import UserError


def register(subcommands) -> None:
    _register_dedup(subcommands)
    _register_leakage(subcommands)
    _register_synth(subcommands)


def _register_dedup(subcommands) -> None:
    dd = subcommands.add_parser("dedup", help="exact and near-duplicate records (TF-IDF, MinHash-LSH or embeddings)")
    dd.add_argument("--data", required=True, help="JSON/JSONL file, URL or named source")
    dd.add_argument("--fields", default="instruction,input,output", help="comma list (default instruction,input,output)")
    dd.add_argument("--threshold", type=float, default=0.8, help="cosine for near-duplicates (default 0.8)")
    dd.add_argument("--method", default="auto",
                    help="auto (chunked TF-IDF, MinHash-LSH beyond 100k records), dense, chunked, minhash or embedding")
    dd.add_argument("--out", default=None, help="write the kept records here, and the pairs beside it")
    dd.add_argument("--drop-instruction-duplicates", action="store_true",
                    help="also drop records whose instruction alone duplicates an earlier one")
    dd.add_argument("--show", type=int, default=10, help="pairs to print (default 10)")
    dd.set_defaults(handler=cmd_dedup)


def _register_leakage(subcommands) -> None:
    lk = subcommands.add_parser("leakage", help="test records that are (nearly) training records")
    lk.add_argument("--data", default=None, help="a dataset: its train and test splits (as finetune splits it)")
    lk.add_argument("--train", default=None, help="or a training file ...")
    lk.add_argument("--test", default=None, help="... and a test file")
    lk.add_argument("--method", default="rapidfuzz", choices=("rapidfuzz", "tfidf"), help="near prompts by rapidfuzz (default) or tfidf")
    lk.add_argument("--cutoff", type=float, default=None, help="rapidfuzz ratio 0-100 (default 90) or cosine (default 0.8)")
    add_split_options(lk)
    lk.add_argument("--show", type=int, default=5, help="leaks of each kind to print (default 5)")
    lk.add_argument("--out", default=None, help="write every leak with its indices to this JSON file")
    lk.set_defaults(handler=cmd_leakage)


def _register_synth(subcommands) -> None:
    sy = subcommands.add_parser("synth", help="new instruction data from a served model, Magpie-style")
    sy.add_argument("--url", required=True, help="instructkit serve (http://127.0.0.1:8000) or Ollama (http://localhost:11434)")
    sy.add_argument("--api", default="openai", help="openai (raw /v1/completions, default) or ollama (/api/generate, raw)")
    sy.add_argument("--model", default="gemma-3-270m", help="the served model's name")
    sy.add_argument("--preset", default="gemma", help="chat format: llama3, gemma, chatml, phi3 or alpaca")
    sy.add_argument("--n", type=int, default=10, help="records to make (default 10)")
    sy.add_argument("--out", required=True, help="JSONL file to grow (a log beside it records every item's fate)")
    sy.add_argument("--seed", type=int, default=123, help="item k uses seed + k")
    sy.add_argument("--query-temperature", type=float, default=1.0)
    sy.add_argument("--response-temperature", type=float, default=0.7)
    sy.add_argument("--concurrency", type=int, default=4)
    sy.add_argument("--retries", type=int, default=3)
    sy.add_argument("--timeout", type=float, default=120.0)
    sy.add_argument("--api-key-env", default=None, help="environment variable holding an API key")
    sy.add_argument("--dry-run", action="store_true", help="print the exact request bodies and stop")
    sy.add_argument("--respond-only", action="store_true", help="add responses to the instructions in --data")
    sy.add_argument("--data", default=None, help="with --respond-only: the instruction file")
    sy.set_defaults(handler=cmd_synth)


def cmd_dedup(args: argparse.Namespace) -> int:
    from instructkit.data.conversations import comparison_fields
    from instructkit.datatools.dedup import FIELDS, find_duplicates, load_any_records

    path, records = load_any_records(args.data)
    fields = tuple(f.strip() for f in args.fields.split(",") if f.strip())
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise UserError(f"--fields: unknown field {unknown[0]!r} (choose from {', '.join(FIELDS)})")
    drop = ("instruction", "input", "output") if args.drop_instruction_duplicates else ("input", "output")
    started = time.perf_counter()
    result = find_duplicates(records, fields=fields, threshold=args.threshold, method=args.method, drop_fields=drop)
    print(f"{len(records):,} records of {path}, threshold {args.threshold:g}, method {result.method}, "
          f"{time.perf_counter() - started:.1f} s")
    for name, counts in result.per_field.items():
        print(f"  {name:<12} exact duplicates {counts['exact']:>6,}   near-duplicates {counts['near']:>6,}")
    print(f"{len(result.clusters):,} clusters; the chapter's rule drops {len(result.dropped):,} records "
          f"(the later record of each pair found on {' or '.join(drop)})")
    for pair in result.pairs[: args.show]:
        kind = "exact" if pair.exact else f"{pair.similarity:.3f}"
        first, second = (comparison_fields(records[i]).get(pair.field, "") for i in (pair.first, pair.second))
        print(f"  [{pair.first}] ~ [{pair.second}] {pair.field} ({kind}): {str(first)[:60]!r} | {str(second)[:60]!r}")
    if args.out:
        _write_dedup(Path(args.out), path, records, result, args.threshold)
    return 0


def _write_dedup(out: Path, source, records: list[dict], result, threshold: float) -> None:
    from instructkit.fileio import atomic_write_json

    dropped = set(result.dropped)
    report = out.with_name(out.stem + "-duplicates.json")
    atomic_write_json(out, [r for i, r in enumerate(records) if i not in dropped])
    atomic_write_json(report, {
        "source": str(source), "threshold": threshold, "method": result.method, "per_field": result.per_field,
        "pairs": [vars(p) for p in result.pairs], "clusters": result.clusters, "dropped": result.dropped})
    print(f"Wrote {len(records) - len(dropped):,} kept records to {out} and the report to {report}")


def _leakage_splits(args: argparse.Namespace):
    """(train records, test records, a phrase saying where they came from)."""
    from instructkit.data.pipeline import prepare_data
    from instructkit.datatools.dedup import load_any_records

    if bool(args.data) == bool(args.train or args.test) or bool(args.train) != bool(args.test):
        raise UserError("leakage needs --data D (its split) or both --train A and --test B")
    if args.data:
        prepared = prepare_data(args.data, skip_invalid=args.skip_invalid, shuffle_seed=args.shuffle_seed,
                                group_near_duplicates=args.group_near_duplicates)
        return prepared.splits.train, prepared.splits.test, f"{args.data} (its train and test splits)"
    (_, train), (_, test) = load_any_records(args.train), load_any_records(args.test)
    return train, test, f"{args.test} against {args.train}"


def cmd_leakage(args: argparse.Namespace) -> int:
    from instructkit.data.conversations import comparison_fields
    from instructkit.datatools.leakage import find_leaks

    train, test, where = _leakage_splits(args)
    cutoff = args.cutoff if args.cutoff is not None else (90.0 if args.method == "rapidfuzz" else 0.8)
    leaks = find_leaks(train, test, cutoff=cutoff, method=args.method)
    summary = leaks.summary()
    print(f"Leakage, {where}: {summary['test']:,} test records against {summary['train']:,} training records")
    print(f"  exact record {summary['exact_record']}, exact instruction {summary['exact_instruction']}, near prompt "
          f"{summary['near']} ({args.method} >= {cutoff:g}), shared 13-gram of output {summary['ngram_13']}")
    print(f"  test records with an exact, near or 13-gram twin in training: {summary['leaked_test_records']} "
          "(the same instruction alone is listed, not counted)")
    for kind, items in (("exact record", leaks.exact_record), ("exact instruction", leaks.exact_instruction),
                        ("near prompt", leaks.near), ("13-gram", leaks.ngram)):
        for item in items[: args.show]:
            t, i = item[0], item[1]
            print(f"  {kind}: test [{t}] ~ train [{i}]: {comparison_fields(test[t])['instruction'][:50]!r} | "
                  f"{comparison_fields(train[i])['instruction'][:50]!r}")
    if args.out:
        from instructkit.fileio import atomic_write_json

        atomic_write_json(Path(args.out), {"summary": summary, "exact_record": leaks.exact_record,
                                           "exact_instruction": leaks.exact_instruction, "near": leaks.near,
                                           "ngram": leaks.ngram})
    return 0


def _instructions_to_answer(args: argparse.Namespace) -> list[dict]:
    from instructkit.data.records import load_records
    from instructkit.data.sources import resolve_source

    if not args.data:
        raise UserError("--respond-only needs --data FILE with the instructions to answer")
    return [{"instruction": r["instruction"], "input": r.get("input", "")} for r in
            load_records(resolve_source(args.data), skip_invalid=True).records]


def cmd_synth(args: argparse.Namespace) -> int:
    from instructkit.datatools.synth import SynthConfig, Synthesizer, respond_only

    config = SynthConfig(url=args.url, api=args.api, model=args.model, preset=args.preset, n=args.n, out=args.out,
                         seed=args.seed, concurrency=args.concurrency, retries=args.retries, timeout=args.timeout,
                         query_temperature=args.query_temperature, response_temperature=args.response_temperature,
                         api_key=env_secret("--api-key-env", args.api_key_env))
    synthesizer = Synthesizer(config)
    if args.dry_run:
        for request in synthesizer.dry_run():
            print(f"POST {request['url']}  ({request['stage']} stage)")
            print(json.dumps(request["body"], indent=2, ensure_ascii=False))
        return 0
    result = respond_only(config, _instructions_to_answer(args)) if args.respond_only else synthesizer.run()
    print(f"Accepted {result['accepted']} of {result['attempted']} attempted items into {result['out']}")
    for reason, count in sorted(result["dropped"].items()):
        print(f"  dropped ({reason}): {count}")
    for failure in result["failed"]:
        print(f"  failed: item {failure['k']}: {failure['error']} (tried again on the next run)")
    return 0 if not result["failed"] else 1
