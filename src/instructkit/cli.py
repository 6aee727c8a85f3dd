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
    parser.add_argument("--group-near-duplicates", action="store_true",
                        help="keep near-duplicate prompts on one side of the split (no test prompt with a twin in training)")
    parser.add_argument("--prompt-style", default=None, help="alpaca (default for GPT-2), phi3, gemma")
    parser.add_argument("--mask-instructions", action="store_true", help="supervise only the response and end token")
    parser.add_argument("--max-length", type=int, default=None, help="truncate examples to N training positions")
    parser.add_argument("--batch-size", type=int, default=8)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"--{name} must be a positive integer, got {value}")


class _Parser(argparse.ArgumentParser):
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


def cmd_data(args: argparse.Namespace) -> int:
    from instructkit.data.pipeline import encode_splits, length_stats, padding_shares, prepare_data, write_splits
    from instructkit.data.prompts import get_prompt_style
    from instructkit.models.tokenizer import load_tokenizer

    _positive("max-length", args.max_length)
    _positive("batch-size", args.batch_size)
    style = get_prompt_style(args.prompt_style or "alpaca")
    tokenizer = load_tokenizer(args.tokenizer)
    data = prepare_data(args.data, skip_invalid=args.skip_invalid, shuffle_seed=args.shuffle_seed,
                        group_near_duplicates=args.group_near_duplicates)
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
    if args.group_near_duplicates:
        order += ", near-duplicate prompts grouped"
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


def _inference_model(spec: str, args: argparse.Namespace):
    """A model for generate/respond/chat/serve: loaded, its decoding weights made (CPU kernels
    only: "auto" means exact weights on a GPU), then put on --device in --precision."""
    from instructkit.decode.load import quantize_loaded
    from instructkit.devices import place_for_inference, resolve_device
    from instructkit.models.registry import load_model

    device = resolve_device(args.device, args.precision)
    mode = args.quantize
    if device.type != "cpu":
        if mode not in ("none", "auto"):
            raise UserError(f"--quantize {mode} runs on CPU kernels; with --device {device.type} use --quantize none")
        mode = "none"
    loaded = quantize_loaded(load_model(spec), mode)
    place_for_inference(loaded.model, device, args.precision)
    if getattr(args, "compile", False):  # generate, chat and serve offer --compile
        from instructkit.decode import static_decode

        print("Compiling the decode step (torch.compile; ~10 s, up to ~100 s the first time on a machine)...", file=sys.stderr, flush=True)
        static_decode.enable(loaded.model)
    return loaded


COMPILE_HELP = ("compile the decode step into one graph (torch.compile): faster tokens at batch 1 after a "
                "first compile of ~10-30 s (docs/BENCHMARKS.md)")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, default), cpu or cuda")
    parser.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 (CUDA only)")


def cmd_generate(args: argparse.Namespace) -> int:
    from instructkit.data.prompts import get_prompt_style
    from instructkit.decode.generate import Sampling, generate, stream_text
    _positive("max-new-tokens", args.max_new_tokens)
    if args.top_k is not None:
        _positive("top-k", args.top_k)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    loaded = _inference_model(args.model, args)
    tokenizer = loaded.tokenizer
    stop_ids = {tokenizer.eos_id}
    text = args.prompt
    if args.prompt_style:
        style = get_prompt_style(args.prompt_style)
        text = style.prompt({"instruction": args.prompt, "input": args.input or ""})
        stop_ids.add(style.end_token_id(tokenizer))
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
    ("device", str, "auto (CUDA when available, default), cpu or cuda"),
    ("precision", str, "fp32 (default) or bf16 (autocast; CUDA only)"),
    ("strategy", str, "with --nproc / torchrun: ddp (default, replicated weights) or fsdp (sharded, FSDP2)"),
    ("log", str, "metrics loggers besides metrics.jsonl (comma list): tensorboard (event files in the run folder: "
                 "tensorboard --logdir runs/), wandb, mlflow (when installed)"),
]


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    for option, kind, text in TRAIN_OPTIONS:
        parser.add_argument(f"--{option}", type=kind, default=None, help=text)
    parser.add_argument("--lora-targets", default=None, help="comma list: attention, mlp, or layer names")
    parser.add_argument("--mask-instructions", action="store_true", default=None, help="supervise only the response and end token")
    parser.add_argument("--freeze-embedding", action="store_true", default=None, help="freeze the (tied) token embedding")
    parser.add_argument("--skip-invalid", action="store_true", default=None, help="drop invalid records instead of stopping")
    parser.add_argument("--group-near-duplicates", action="store_true", default=None,
                        help="keep near-duplicate prompts on one side of the split")
    parser.add_argument("--no-sample", dest="sample_prompt", action="store_false", default=None, help="skip the per-epoch sample")


def _train_config(args: argparse.Namespace, base):
    """The TrainConfig of `base` with every option given on the command line applied."""
    values = base.to_dict()
    for option, _, _ in TRAIN_OPTIONS:
        value = getattr(args, option.replace("-", "_"))
        if value is not None:
            values[option.replace("-", "_")] = value
    for name in ("mask_instructions", "freeze_embedding", "skip_invalid", "sample_prompt", "group_near_duplicates"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.lora_targets:
        values["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    for name in ("model", "data", "out"):
        if getattr(args, name, None):
            values[name] = getattr(args, name)
    from instructkit.train.config import TrainConfig

    return TrainConfig.from_dict(values).validate()


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def _relaunch_for_nproc(args: argparse.Namespace) -> int | None:
    """With --nproc N > 1 outside torchrun: run this command again as N processes through
    PyTorch's own launcher (torch.distributed.run, standalone) and return its exit code."""
    from instructkit.train import distributed

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be positive, got {args.nproc}")
    if args.nproc and args.nproc > 1 and not distributed.launched_by_torchrun():
        return distributed.relaunch(args.nproc, _without_nproc(args.argv))
    return None


def cmd_finetune(args: argparse.Namespace) -> int:
    from instructkit.train.config import TrainConfig
    from instructkit.train.finetune import finetune, load_run_config

    relaunched = _relaunch_for_nproc(args)
    if relaunched is not None:
        return relaunched

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
    from instructkit.data.fewshot import BASE_MODEL_STYLE
    from instructkit.data.pipeline import prepare_data
    from instructkit.respond import respond, style_for

    _positive("max-new-tokens", args.max_new_tokens)
    _positive("batch-size", args.batch_size)
    if args.stop_on_repeat < 0:
        raise UserError(f"--stop-on-repeat must be 0 (off) or more, got {args.stop_on_repeat}")
    if args.few_shot < 0:
        raise UserError(f"--few-shot must be 0 or more, got {args.few_shot}")
    if bool(args.run) == bool(args.model):
        raise UserError("respond needs exactly one of --run RUN_DIR or --model M")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run = RunFolder(args.run).require_finished() if args.run else None
    saved = run.config() if run is not None and run.has_config() else {}
    data = args.data or saved.get("data")
    if data is None:
        raise UserError("respond needs --data (or a --run whose config names its data)")
    loaded = _inference_model(str(run.path) if run else args.model, args)
    style = style_for(loaded, run, args.prompt_style or (BASE_MODEL_STYLE if args.few_shot else None))
    # The run's split, unless told otherwise: the same records stay held out.
    prepared = prepare_data(data, skip_invalid=args.skip_invalid or saved.get("skip_invalid", False),
                            shuffle_seed=args.shuffle_seed if args.shuffle_seed is not None else saved.get("shuffle_seed"),
                            group_near_duplicates=args.group_near_duplicates or saved.get("group_near_duplicates", False))
    entries = prepared.splits.by_name(args.split)
    out = Path(args.out) if args.out else (run.responses_file(args.split) if run else Path(f"{args.split}-responses.json"))
    started = time.perf_counter()
    respond(loaded, style, entries, out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            shots=args.few_shot, shot_pool=prepared.splits.train, repeat_stop=args.stop_on_repeat, beams=args.beams,
            length_penalty=args.length_penalty)
    print(f"Wrote {len(entries)} responses to {out} (and {out.with_suffix('.jsonl')}) in {time.perf_counter() - started:.0f} s")
    return 0


def _model_and_style(args: argparse.Namespace):
    """The model and prompt style a command works on: a finished run folder (its saved style), or
    any --model spec (its --prompt-style, else the model's default)."""
    from instructkit.models.registry import load_model
    from instructkit.respond import style_for

    if bool(getattr(args, "run", None)) == bool(getattr(args, "model", None)):
        raise UserError(f"{args.command} needs exactly one of --run RUN_DIR or --model SPEC")
    run = RunFolder(args.run).require_finished() if args.run else None
    loaded = load_model(str(run.path) if run else args.model)
    return loaded, style_for(loaded, run, args.prompt_style)


def cmd_export(args: argparse.Namespace) -> int:
    from instructkit.export import export_model

    started = time.perf_counter()
    loaded, style = _model_and_style(args)
    sources = tuple(Path(spec) for spec in (args.run, args.model) if spec and Path(spec).exists())
    exported = export_model(loaded, style, args.format, Path(args.out), quant=args.quant, force=args.force,
                            sources=sources)
    total = sum(path.stat().st_size for path in exported.files)
    print(f"Exported {loaded.name} ({args.format}, prompt style {style.name}) to {exported.folder}: "
          f"{len(exported.files)} files, {total / 1e6:,.0f} MB, in {time.perf_counter() - started:.1f} s")
    print("Next:")
    for step in exported.next_steps:
        print(f"  {step}")
    return 0


# Chat and serving decode one or a few sequences at a time, which is bound by reading the weights:
# "auto" picks the mode measured fastest while greedy output stays within the agreement target
# (decode/quantize.py auto_mode: int8 where FBGEMM exists, else exact fp32).
TALK_QUANTIZE = "auto"


def _served_style(loaded, run, args: argparse.Namespace):
    """A server or chat must know the prompt style: the run's saved one, else --prompt-style."""
    from instructkit.data.prompts import get_prompt_style

    saved = run.prompt_style() if run is not None else None
    if args.prompt_style:
        return get_prompt_style(args.prompt_style)
    if saved is None:
        raise UserError(f"{loaded.name} has no saved prompt style; pass --prompt-style (alpaca, phi3 or gemma) "
                        "so messages are rendered the way the model expects")
    return saved


def _load_for_talk(args: argparse.Namespace):
    if bool(args.run) == bool(args.model):
        raise UserError(f"{args.command} needs exactly one of --run RUN_DIR or --model SPEC")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run = RunFolder(args.run).require_finished() if args.run else None
    if run is None and RunFolder(args.model).has_config():
        run = RunFolder(args.model).require_finished()  # a run folder given as a model spec keeps its style
    loaded = _inference_model(str(run.path) if run else args.model, args)
    return loaded, run, _served_style(loaded, run, args)


def cmd_chat(args: argparse.Namespace) -> int:
    from instructkit.serve.chat import ChatSession, run_chat

    if not 0 <= args.temperature <= 2:
        raise UserError(f"--temperature must be between 0 and 2, got {args.temperature}")
    _positive("max-new-tokens", args.max_new_tokens)
    loaded, _, style = _load_for_talk(args)
    run_chat(ChatSession(loaded, style, temperature=args.temperature, max_tokens=args.max_new_tokens, seed=args.seed,
                         system=args.system or ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from instructkit.serve.app import ServedModel, serve

    _positive("max-batch", args.max_batch)
    _positive("max-cache-tokens", args.max_cache_tokens)
    _positive("max-request-bytes", args.max_request_bytes)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    loaded, run, style = _load_for_talk(args)
    models = [ServedModel(run.path.name if run else loaded.name, loaded, style, "fine-tuned" if run else "model")]
    if args.compare_base:
        if run is None or not run.has_config():
            raise UserError("--compare-base needs --run: the base model is the one the run started from")
        base_spec = run.config()["model"]
        models.append(ServedModel(Path(base_spec).name or base_spec, _inference_model(base_spec, args), style, "base"))
        if models[1].id == models[0].id:
            models[1].id += "-base"
    serve(models, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch,
          max_cache_tokens=args.max_cache_tokens, max_request_bytes=args.max_request_bytes,
          allowed_hosts=args.allowed_hosts)
    return 0


# (option, type, help) of the dpo command; the defaults live in DPOConfig (the book's).
DPO_OPTIONS = [
    ("beta", float, "DPO's beta (default 0.1)"),
    ("lr", float, "AdamW learning rate (default 5e-6)"),
    ("weight-decay", float, "AdamW weight decay on matrices (default 0.01)"),
    ("epochs", int, "passes over the training pairs (default 1)"),
    ("batch-size", int, "preference pairs per step (default 8)"),
    ("seed", int, "seed of the data order and LoRA init (default 123)"),
    ("logp-reduction", str, "mean (the book's, length-normalised) or sum (TRL's default)"),
    ("loss", str, "sigmoid (DPO, default), ipo or robust"),
    ("label-smoothing", float, "for sigmoid (conservative DPO) and robust (default 0)"),
    ("sft-weight", float, "weight of an SFT term on the chosen response (default 0)"),
    ("batching", str, "grouped (pairs of similar length together, default) or chapter (the book's shuffled order)"),
    ("max-steps", int, "stop after this many steps (the chapter's pairs: 40 of the epoch's 116, chosen on the "
                       "validation split; a full epoch makes the model stop ending its answers)"),
    ("max-length", int, "truncate each prompt + response to N positions (pairs left with no response are dropped)"),
    ("warmup", int, "linear warm-up steps (default 0)"),
    ("clip", float, "clip the gradient norm"),
    ("eval-every", int, "steps between evaluations (default 5)"),
    ("eval-batches", int, "train and validation batches per evaluation (default 5)"),
    ("save-every", int, "steps between resumable checkpoints (default 50)"),
    ("prompt-style", str, "alpaca, phi3 or gemma (default: the starting run's)"),
    ("lora-rank", int, "LoRA rank; 0 = every parameter trains (default)"),
    ("lora-alpha", float, "LoRA alpha; the update is scaled by alpha/rank"),
    ("threads", int, "torch CPU threads"),
    ("device", str, "auto (CUDA when available, default), cpu or cuda"),
    ("precision", str, "fp32 (default) or bf16 (autocast; CUDA only)"),
    ("grad-accum", int, "micro-batches per optimizer step (default 1)"),
    ("schedule", str, "constant (default) or cosine, after the warm-up"),
    ("early-stop", int, "stop after N evaluations without a better validation loss"),
    ("log", str, "metrics loggers besides metrics.jsonl (comma list): tensorboard, wandb, mlflow (when installed)"),
    ("strategy", str, "with --nproc / torchrun: ddp (default, replicated weights) or fsdp (sharded, FSDP2)"),
]


def cmd_dpo(args: argparse.Namespace) -> int:
    from instructkit.train.dpo import DPOConfig, dpo

    relaunched = _relaunch_for_nproc(args)
    if relaunched is not None:
        return relaunched
    if args.resume:
        values = DPOConfig.from_dict(RunFolder(args.resume).config()).to_dict()
        values["out"] = args.resume
    else:
        if bool(args.run) == bool(args.model):
            raise UserError("dpo needs exactly one of --run SFT_RUN or --model SPEC (or --resume R2)")
        if not args.data or not args.out:
            raise UserError("dpo needs --data PREFS and --out R2")
        values = DPOConfig(start=args.run or args.model, data=args.data, out=args.out).to_dict()
    for option, _, _ in DPO_OPTIONS:
        value = getattr(args, option.replace("-", "_"))
        if value is not None:
            values[option.replace("-", "_")] = value
    for name in ("precompute_ref", "freeze_embedding", "skip_invalid", "append_eos"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.lora_targets:
        values["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.resume and (args.data or args.run or args.model):
        for name, value in (("data", args.data), ("start", args.run or args.model)):
            if value:
                values[name] = value
    config = DPOConfig(**values).validate()
    dpo(config, resume=bool(args.resume))
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from instructkit.datatools.dedup import FIELDS, find_duplicates, load_any_records
    from instructkit.fileio import atomic_write_json

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
        print(f"  [{pair.first}] ~ [{pair.second}] {pair.field} ({kind}): "
              f"{str(records[pair.first].get(pair.field, ''))[:60]!r} | {str(records[pair.second].get(pair.field, ''))[:60]!r}")
    if args.out:
        out = Path(args.out)
        dropped = set(result.dropped)
        atomic_write_json(out, [r for i, r in enumerate(records) if i not in dropped])
        atomic_write_json(out.with_name(out.stem + "-duplicates.json"), {
            "source": str(path), "threshold": args.threshold, "method": result.method, "per_field": result.per_field,
            "pairs": [vars(p) for p in result.pairs], "clusters": result.clusters, "dropped": result.dropped})
        print(f"Wrote {len(records) - len(dropped):,} kept records to {out} and the report to "
              f"{out.with_name(out.stem + '-duplicates.json')}")
    return 0


def cmd_leakage(args: argparse.Namespace) -> int:
    from instructkit.data.pipeline import prepare_data
    from instructkit.datatools.dedup import load_any_records
    from instructkit.datatools.leakage import find_leaks

    if bool(args.data) == bool(args.train or args.test) or bool(args.train) != bool(args.test):
        raise UserError("leakage needs --data D (its split) or both --train A and --test B")
    if args.data:
        prepared = prepare_data(args.data, skip_invalid=args.skip_invalid, shuffle_seed=args.shuffle_seed,
                                group_near_duplicates=args.group_near_duplicates)
        train, test, where = prepared.splits.train, prepared.splits.test, f"{args.data} (its train and test splits)"
    else:
        (_, train), (_, test) = load_any_records(args.train), load_any_records(args.test)
        where = f"{args.test} against {args.train}"
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
            print(f"  {kind}: test [{t}] ~ train [{i}]: {test[t].get('instruction', '')[:50]!r} | "
                  f"{train[i].get('instruction', '')[:50]!r}")
    if args.out:
        from instructkit.fileio import atomic_write_json

        atomic_write_json(Path(args.out), {"summary": summary, "exact_record": leaks.exact_record,
                                           "exact_instruction": leaks.exact_instruction, "near": leaks.near,
                                           "ngram": leaks.ngram})
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import os

    from instructkit.datatools.synth import SynthConfig, Synthesizer, respond_only

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    config = SynthConfig(url=args.url, api=args.api, model=args.model, preset=args.preset, n=args.n, out=args.out,
                         seed=args.seed, concurrency=args.concurrency, retries=args.retries, timeout=args.timeout,
                         query_temperature=args.query_temperature, response_temperature=args.response_temperature,
                         api_key=key)
    synthesizer = Synthesizer(config)
    if args.dry_run:
        for request in synthesizer.dry_run():
            print(f"POST {request['url']}  ({request['stage']} stage)")
            print(json.dumps(request["body"], indent=2, ensure_ascii=False))
        return 0
    if args.respond_only:
        from instructkit.data.records import load_records
        from instructkit.data.sources import resolve_source

        if not args.data:
            raise UserError("--respond-only needs --data FILE with the instructions to answer")
        records = [{"instruction": r["instruction"], "input": r.get("input", "")} for r in
                   load_records(resolve_source(args.data), skip_invalid=True).records]
        result = respond_only(config, records)
    else:
        result = synthesizer.run()
    print(f"Accepted {result['accepted']} of {result['attempted']} attempted items into {result['out']}")
    for reason, count in sorted(result["dropped"].items()):
        print(f"  dropped ({reason}): {count}")
    for failure in result["failed"]:
        print(f"  failed: item {failure['k']}: {failure['error']} (tried again on the next run)")
    return 0 if not result["failed"] else 1


def _judge_config(args: argparse.Namespace):
    import os

    from instructkit.evaluate.judge import JudgeConfig

    if not args.judge_url:
        return None
    if not args.judge_model:
        raise UserError("--judge-url needs --judge-model (e.g. llama3)")
    key = None
    if args.judge_api_key_env:
        key = os.environ.get(args.judge_api_key_env)
        if not key:
            raise UserError(f"--judge-api-key-env {args.judge_api_key_env}: that environment variable is not set")
    return JudgeConfig(url=args.judge_url, model=args.judge_model, api=args.judge_api, prompt=args.judge_prompt,
                       timeout=args.judge_timeout, retries=args.judge_retries, concurrency=args.judge_concurrency,
                       max_failures=args.judge_max_failures, api_key=key)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from instructkit.evaluate.evaluation import agreement, evaluate_file, load_scores

    if args.preferences:
        from instructkit.evaluate.preference_eval import evaluate_preferences

        _positive("max-new-tokens", args.max_new_tokens)
        result = evaluate_preferences(RunFolder(args.preferences), data=args.data, split=args.split,
                                      max_new_tokens=args.max_new_tokens, judge=_judge_config(args),
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
                           compare_path=Path(args.compare) if args.compare else None,
                           against_path=Path(args.against) if args.against else None, against_label=args.against_label,
                           run_dir=run_dir)
    _print_evaluation(result)
    markdown, html_file = RunFolder(out_dir).report_files
    print(f"Report: {markdown} and {html_file}")
    return _judge_exit_status(result)


def _judge_exit_status(result: dict) -> int:
    """1 when the judge failed (the report says so), after a one-line error; a warning when it
    left some entries unscored within --judge-max-failures."""
    from instructkit.evaluate.evaluation import judge_problem

    problem = judge_problem(result["judge"]) if "judge" in result else None
    if problem is None:
        return 0
    failed = result["judge"]["status"] == "failed"
    print(f"instructkit: {'error' if failed else 'warning'}: {problem}", file=sys.stderr)
    return 1 if failed else 0


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


def cmd_run(args: argparse.Namespace) -> int:
    """The main job (main_job.py holds the recipe)."""
    from instructkit.main_job import MainJob, run_main_job
    from instructkit.runs import default_run_dir

    job = MainJob(model=args.model, data=args.data, out=args.out or default_run_dir(args.data), seed=args.seed,
                  epochs=args.epochs, lr=args.lr, lora_rank=args.lora_rank, warmup=args.warmup, schedule=args.schedule, max_steps=args.max_steps,
                  max_new_tokens=args.max_new_tokens, beams=args.beams, length_penalty=args.length_penalty,
                  base_max_new_tokens=args.base_max_new_tokens,
                  base_shots=args.base_shots, judge=_judge_config(args), baseline=args.baseline,
                  baseline_label=args.baseline_label)
    if job.baseline and not Path(job.baseline).is_file():
        raise UserError(f"--baseline {job.baseline}: no such responses file")
    _positive("max-new-tokens", job.max_new_tokens)
    _positive("epochs", job.epochs)
    if job.lr is not None and job.lr <= 0:
        raise UserError(f"--lr must be positive, got {job.lr}")
    if job.lora_rank is not None and job.lora_rank < 0:
        raise UserError(f"--lora-rank must be 0 (no LoRA) or more, got {job.lora_rank}")
    _positive("beams", job.beams)
    _positive("base-max-new-tokens", job.base_max_new_tokens)
    if job.base_shots < 0:
        raise UserError(f"--base-shots must be 0 or more, got {job.base_shots}")
    result = run_main_job(job)
    _print_evaluation(result)
    markdown, html_file = RunFolder(job.out).report_files
    print(f"Report: {markdown} and {html_file}")
    print(f"Wall time: {result['wall_seconds']:.0f} s")
    return _judge_exit_status(result)


def _add_beam_options(parser: argparse.ArgumentParser, default: int | None, default_text: str) -> None:
    parser.add_argument("--beams", type=int, default=default, help=f"beam search with this many beams (default {default_text})")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: a finished beam scores its summed log-probability / length ** this "
                             "(default 1.0; transformers' meaning)")


def _add_judge_options(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    gen.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--quantize", default="none", help="low-precision decoding weights: none (default), fp16, int8, int4 or auto")
    gen.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    _add_device_options(gen)
    gen.set_defaults(handler=cmd_generate)

    tune = subcommands.add_parser("finetune", help="fine-tune a model on instruction data (full or LoRA)")
    tune.add_argument("--model", default=None, help="preset, folder, .gguf, .pth or HF repo id (default gemma-3-270m)")
    tune.add_argument("--data", default=None, help="JSON/JSONL file, URL, or chapter7 / alpaca52k")
    tune.add_argument("--out", default=None, help="run folder to create")
    tune.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    tune.add_argument("--nproc", type=int, default=None,
                      help="data-parallel processes on this machine (torchrun, standalone); --batch-size is per process")
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
    resp.add_argument("--stop-on-repeat", type=int, default=0, metavar="N",
                      help="end a response when its last N tokens already appeared in it (a greedy loop), "
                           "dropping the repeat; 0 = off (default; the main job uses 16)")
    resp.add_argument("--batch-size", type=int, default=128, help="prompts decoded together (default 128)")
    resp.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's)")
    _add_beam_options(resp, 1, "1: greedy")
    resp.add_argument("--skip-invalid", action="store_true")
    resp.add_argument("--shuffle-seed", type=int, default=None, help="default: the run's")
    resp.add_argument("--group-near-duplicates", action="store_true", help="the grouped split (default: the run's)")
    resp.add_argument("--quantize", default="none", help="none (default: exact fp32), fp16, int8, int4 or auto")
    _add_device_options(resp)
    resp.add_argument("--few-shot", type=int, default=0,
                      help="K solved training examples before each question, answer = first line (for base "
                           "models; in the alpaca style unless --prompt-style is given)")
    resp.set_defaults(handler=cmd_respond)

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
    _add_judge_options(ev)
    ev.set_defaults(handler=cmd_evaluate)

    exp = subcommands.add_parser("export", help="export a model to Hugging Face, GGUF (llama.cpp) or Ollama")
    exp.add_argument("--run", default=None, help="a finished fine-tuning run folder (LoRA runs are exported merged)")
    exp.add_argument("--model", default=None, help="or any model spec, e.g. gemma-3-270m (the embedded base model)")
    exp.add_argument("--prompt-style", default=None, help="with --model: the style to write into the templates")
    exp.add_argument("--format", required=True, help="hf, gguf or ollama")
    exp.add_argument("--quant", default=None,
                     help="gguf/ollama: f32, f16 (gguf default), q8_0 (ollama default) or q4_k_m (needs llama-cpp-python)")
    exp.add_argument("--out", required=True, help="folder to write (refused if it exists and is not empty)")
    exp.add_argument("--force", action="store_true", help="replace a previous export in --out")
    exp.set_defaults(handler=cmd_export)

    def talk_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--run", default=None, help="a finished fine-tuning run folder (its prompt style is used)")
        parser.add_argument("--model", default=None, help="or any model spec (then --prompt-style is needed)")
        parser.add_argument("--prompt-style", default=None, help="alpaca, phi3 or gemma (default: the run's)")
        parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
        parser.add_argument("--quantize", default=TALK_QUANTIZE,
                            help="decoding weights: none, fp16, int8, int4 or auto (default: int8 where the CPU has FBGEMM, the fastest that keeps "
                                 "greedy answers within the agreement target, docs/BENCHMARKS.md)")
        parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
        _add_device_options(parser)

    talk = subcommands.add_parser("chat", help="talk to a model in the terminal (streaming, multi-turn)")
    talk_options(talk)
    talk.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    talk.add_argument("--max-new-tokens", type=int, default=256)
    talk.add_argument("--seed", type=int, default=None, help="seed for sampled answers (turn k uses seed + k)")
    talk.add_argument("--system", default=None, help="a system prompt")
    talk.set_defaults(handler=cmd_chat)

    srv = subcommands.add_parser("serve", help="an OpenAI-compatible server and a chat page for a model")
    talk_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=PORT, default=8000, help="port (0 picks a free one; the bound URL is printed)")
    srv.add_argument("--api-key-env", default=None, help="environment variable holding the API key clients must send")
    srv.add_argument("--max-batch", type=int, default=8, help="requests decoded together per model (default 8)")
    srv.add_argument("--compare-base", action="store_true", help="also serve the run's base model, for the page's compare mode")
    srv.add_argument("--max-cache-tokens", type=int, default=32_768,
                     help="KV-cache budget per model, in rows x tokens: requests beyond it wait (default 32768, ~1.2 GB for Gemma 3 270M)")
    srv.add_argument("--max-request-bytes", type=int, default=4_000_000,
                     help="larger request bodies are refused with 413 before parsing (default 4000000)")
    srv.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                     help="Host header names to answer besides the bound address (against DNS rebinding; '*' allows any)")
    srv.set_defaults(handler=cmd_serve)

    pref = subcommands.add_parser("dpo", help="preference tuning (DPO) of a fine-tuned model",
                                  description="Direct Preference Optimization, the book's defaults. Unlike the book, "
                                              "each response gets the end token appended (--no-append-eos: as the book), "
                                              "so the model learns where to stop.")
    pref.add_argument("--run", "--sft-run", dest="run", default=None,
                      help="a finished fine-tuning run to start from (its prompt style is used); under a torchrun you "
                           "start yourself write --sft-run, since torchrun's parser takes --run for its --run-path")
    pref.add_argument("--model", default=None, help="or any model spec")
    pref.add_argument("--data", default=None, help="preference records: instruction, input, chosen, rejected")
    pref.add_argument("--out", default=None, help="run folder to create")
    pref.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted DPO run")
    pref.add_argument("--nproc", type=int, default=None,
                      help="data-parallel processes on this machine (torchrun, standalone, DDP); --batch-size is per process")
    for option, kind, text in DPO_OPTIONS:
        pref.add_argument(f"--{option}", type=kind, default=None, help=text)
    pref.add_argument("--lora-targets", default=None, help="comma list: attention, mlp, or layer names")
    pref.add_argument("--precompute-ref", action="store_true", default=None,
                      help="compute the reference log-probs once (eval mode) instead of keeping a second model")
    pref.add_argument("--append-eos", dest="append_eos", action="store_true", default=None, help="(default)")
    pref.add_argument("--no-append-eos", dest="append_eos", action="store_false", help="as the book: no end token")
    pref.add_argument("--freeze-embedding", action="store_true", default=None, help="freeze the (tied) token embedding")
    pref.add_argument("--skip-invalid", action="store_true", default=None, help="drop invalid records instead of stopping")
    pref.set_defaults(handler=cmd_dpo)

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

    lk = subcommands.add_parser("leakage", help="test records that are (nearly) training records")
    lk.add_argument("--data", default=None, help="a dataset: its train and test splits (as finetune splits it)")
    lk.add_argument("--train", default=None, help="or a training file ...")
    lk.add_argument("--test", default=None, help="... and a test file")
    lk.add_argument("--method", default="rapidfuzz", choices=("rapidfuzz", "tfidf"), help="near prompts by rapidfuzz (default) or tfidf")
    lk.add_argument("--cutoff", type=float, default=None, help="rapidfuzz ratio 0-100 (default 90) or cosine (default 0.8)")
    lk.add_argument("--skip-invalid", action="store_true")
    lk.add_argument("--shuffle-seed", type=int, default=None)
    lk.add_argument("--group-near-duplicates", action="store_true", help="check the grouped split instead")
    lk.add_argument("--show", type=int, default=5, help="leaks of each kind to print (default 5)")
    lk.add_argument("--out", default=None, help="write every leak with its indices to this JSON file")
    lk.set_defaults(handler=cmd_leakage)

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

    run = subcommands.add_parser("run", help="the main job: fine-tune, respond on the test split, evaluate, report")
    run.add_argument("--model", default="gemma-3-270m")
    run.add_argument("--data", default="builtin", help="default: the built-in verifiable dataset (offline)")
    run.add_argument("--out", default=None, help="run folder (default: runs/ and the data's name, e.g. runs/builtin)")
    run.add_argument("--seed", type=int, default=123, help="seed of every random draw (default 123)")
    run.add_argument("--epochs", type=int, default=None,
                     help="default: 1 on the built-in data, 2 on any other (chosen on each one's validation split)")
    run.add_argument("--lr", type=float, default=None,
                     help="peak learning rate (default: 1e-4 when every weight but the embedding trains, 5e-4 with LoRA)")
    run.add_argument("--lora-rank", type=int, default=None,
                     help="LoRA rank, 0 = every weight but the tied embedding trains (default: 0 on the built-in "
                          "data, 16 on any other; chosen on each one's validation split)")
    run.add_argument("--warmup", type=int, default=10, help="linear warm-up steps before the cosine decay")
    run.add_argument("--schedule", default="cosine", help="constant or cosine (default)")
    run.add_argument("--max-steps", type=int, default=None)
    run.add_argument("--max-new-tokens", type=int, default=None,
                     help="per test response (default: twice the longest training response, at most 256)")
    _add_beam_options(run, None, "4, or 1 (greedy) on the built-in data: chosen on each one's validation split")
    run.add_argument("--base-max-new-tokens", type=int, default=64, help="the base model rarely stops; cap it")
    run.add_argument("--baseline", default=None,
                     help="another system's responses to the test split (e.g. the book's, "
                          "instruction-data-with-response.json), compared with ours in the report")
    run.add_argument("--baseline-label", default=None, help="its name in the report")
    run.add_argument("--base-shots", type=int, default=3,
                     help="solved training examples before each question for the base model (default 3; its answer is "
                          "the first line it writes)")
    _add_judge_options(run)
    run.set_defaults(handler=cmd_run)
    return parser


MIN_TORCH = (2, 5)  # pyproject.toml says the same; tests/test_torch_minimum.py checks both


def check_torch() -> None:
    import torch

    found = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        raise UserError(f"torch {torch.__version__} is too old: instructkit needs {'.'.join(map(str, MIN_TORCH))} or newer "
                        "(grouped-query attention in scaled_dot_product_attention); `pip install 'torch>=2.5'`")


def main(argv: list[str] | None = None) -> int:
    from instructkit.train import distributed

    parser = build_parser()
    if argv is None:
        argv = distributed.relaunched_argv()  # our own --nproc relaunch hands its arguments over this way
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        check_torch()
        return args.handler(args)
    except UserError as exc:
        print(f"instructkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instructkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
