"""Commands that decode with a model: generate, chat, serve and respond."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from instructkit.cli.common import (NON_NEGATIVE_FLOAT, PORT, POSITIVE_INT, add_beam_options, add_device_options,
                                   add_run_or_model, add_split_options, env_secret, positive, set_threads)
from instructkit.decode.load import COMPILE_MODES, TALK_COMPILE, TALK_QUANTIZE, source_of
from instructkit.errors import UserError


def _add_compile_option(parser: argparse.ArgumentParser, default: str) -> None:
    """--compile [WHEN] (background, now or off; alone: now, its older meaning) and --no-compile."""
    parser.add_argument("--compile", nargs="?", const="now", default=default, choices=COMPILE_MODES, metavar="WHEN",
                        help="when to compile the decode step into one graph (torch.compile; ~1.7x the int8 tokens/s at "
                             "batch 1, docs/BENCHMARKS.md): background (answer eagerly at once, switch to the compiled step "
                             "when a thread has made it), now (before the first answer; --compile alone) or off "
                             f"(default: {default}). The compiled code is cached: only a machine's first start compiles "
                             "for long (60-100 s)")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="the same as --compile off")


def _register_generate(subcommands) -> None:
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
    _add_compile_option(gen, "off")
    add_device_options(gen)
    gen.set_defaults(handler=cmd_generate)


def _talk_options(parser: argparse.ArgumentParser) -> None:
    add_run_or_model(parser, "a finished fine-tuning run folder (its prompt style is used)",
                     "or any model spec (then --prompt-style is needed)")
    parser.add_argument("--prompt-style", default=None,
                        help="model (its own chat template), alpaca, phi3, gemma, chatml or llama3 (default: the run's)")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    parser.add_argument("--quantize", default=TALK_QUANTIZE,
                        help="decoding weights: none, fp16, int8, int4 or auto (default: int8 where the CPU has FBGEMM, the fastest that keeps "
                             "greedy answers within the agreement target, docs/BENCHMARKS.md)")
    _add_compile_option(parser, TALK_COMPILE)
    add_device_options(parser)


def _register_chat_and_serve(subcommands) -> None:
    talk = subcommands.add_parser("chat", help="talk to a model in the terminal (streaming, multi-turn)")
    _talk_options(talk)
    talk.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    talk.add_argument("--max-new-tokens", type=int, default=256)
    talk.add_argument("--seed", type=int, default=None, help="seed for sampled answers (turn k uses seed + k)")
    talk.add_argument("--system", default=None, help="a system prompt")
    talk.set_defaults(handler=cmd_chat)

    srv = subcommands.add_parser("serve", help="an OpenAI-compatible server and a chat page for a model")
    _talk_options(srv)
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


def _register_respond(subcommands) -> None:
    resp = subcommands.add_parser("respond", help="generate responses for a data split (resumable)")
    add_run_or_model(resp, "a fine-tuning run folder", "or any model spec (e.g. gemma-3-270m for the base model)")
    resp.add_argument("--data", default=None, help="data source (default: the run's)")
    resp.add_argument("--split", default="test", help="train, test or val (default test)")
    resp.add_argument("--out", default=None, help="responses .json (default: RUN_DIR/SPLIT-responses.json)")
    resp.add_argument("--prompt-style", default=None)
    resp.add_argument("--max-new-tokens", type=int, default=256)
    resp.add_argument("--stop-on-repeat", type=int, default=0, metavar="N",
                      help="end a response when its last N tokens already appeared in it (a greedy loop), "
                           "dropping the repeat; 0 = off (default; the main job uses 16)")
    resp.add_argument("--batch-size", type=int, default=128,
                      help="rows decoded at once (default 128); the next prompts join as rows end")
    resp.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's)")
    add_beam_options(resp, 1, "1: greedy")
    add_split_options(resp, default_text=" (default: the run's)")
    resp.add_argument("--quantize", default="none", help="none (default: exact fp32), fp16, int8, int4 or auto")
    add_device_options(resp)
    resp.add_argument("--few-shot", type=int, default=0,
                      help="K solved training examples before each question, answer = first line (for base "
                           "models; in the alpaca style unless --prompt-style is given)")
    resp.set_defaults(handler=cmd_respond)


def _decoding(args: argparse.Namespace) -> dict:
    """How to decode, as the one loader (decode/load.py) takes it."""
    return {"device": args.device, "precision": args.precision, "quantize": args.quantize,
            "compile": getattr(args, "compile", "off")}


def _load(args: argparse.Namespace, *, model: str | None = None, strict_style: bool = False,
          prompt_style: str | None = None):
    """The one loader on this command's options (another `model` spec replaces --run/--model)."""
    from instructkit.decode.load import load_for_talk

    set_threads(getattr(args, "threads", None))
    source = {"model": model} if model else {"run": getattr(args, "run", None), "model": args.model}
    return load_for_talk(**source, prompt_style=prompt_style or args.prompt_style, strict_style=strict_style,
                         command=args.command, **_decoding(args))


def cmd_generate(args: argparse.Namespace) -> int:
    from instructkit.data.prompts import resolve_prompt_style
    from instructkit.decode.generate import Sampling, generate, stream_text

    positive("max-new-tokens", args.max_new_tokens)
    if args.top_k is not None:
        positive("top-k", args.top_k)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    loaded = _load(args).loaded
    tokenizer = loaded.tokenizer
    stop_ids = {tokenizer.eos_id}
    text = args.prompt
    if args.prompt_style:
        style = resolve_prompt_style(args.prompt_style, loaded)
        text = style.prompt({"instruction": args.prompt, "input": args.input or ""})
        stop_ids.update(style.stop_ids(tokenizer))
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


def cmd_chat(args: argparse.Namespace) -> int:
    from instructkit.serve.chat import ChatSession, run_chat

    if not 0 <= args.temperature <= 2:
        raise UserError(f"--temperature must be between 0 and 2, got {args.temperature}")
    positive("max-new-tokens", args.max_new_tokens)
    ready = _load(args, strict_style=True)
    run_chat(ChatSession(ready.loaded, ready.style, temperature=args.temperature, max_tokens=args.max_new_tokens, seed=args.seed,
                         system=args.system or ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from instructkit.serve.app import ServedModel, serve

    positive("max-batch", args.max_batch)
    positive("max-cache-tokens", args.max_cache_tokens)
    positive("max-request-bytes", args.max_request_bytes)
    api_key = env_secret("--api-key-env", args.api_key_env)
    ready = _load(args, strict_style=True)
    loaded, run, style = ready.loaded, ready.run, ready.style
    models = [ServedModel(run.path.name if run else loaded.name, loaded, style, "fine-tuned" if run else "model")]
    if args.compare_base:
        if run is None or not run.has_config():
            raise UserError("--compare-base needs --run: the base model is the one the run started from")
        base_spec = run.config()["model"]
        base = _load(args, model=base_spec, prompt_style=style.name).loaded
        models.append(ServedModel(Path(base_spec).name or base_spec, base, style, "base"))
        if models[1].id == models[0].id:
            models[1].id += "-base"
    serve(models, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch,
          max_cache_tokens=args.max_cache_tokens, max_request_bytes=args.max_request_bytes,
          allowed_hosts=args.allowed_hosts)
    return 0


def _check_respond(args: argparse.Namespace) -> None:
    positive("max-new-tokens", args.max_new_tokens)
    positive("batch-size", args.batch_size)
    if args.stop_on_repeat < 0:
        raise UserError(f"--stop-on-repeat must be 0 (off) or more, got {args.stop_on_repeat}")
    if args.few_shot < 0:
        raise UserError(f"--few-shot must be 0 or more, got {args.few_shot}")


def cmd_respond(args: argparse.Namespace) -> int:
    from instructkit.data.fewshot import BASE_MODEL_STYLE
    from instructkit.data.pipeline import prepare_data
    from instructkit.respond import respond

    _check_respond(args)
    _, run = source_of(args.run, args.model, args.command)  # the data is checked before the model loads
    saved = run.config() if run is not None and run.has_config() else {}
    data = args.data or saved.get("data")
    if data is None:
        raise UserError("respond needs --data (or a --run whose config names its data)")
    ready = _load(args, prompt_style=args.prompt_style or (BASE_MODEL_STYLE if args.few_shot else None))
    loaded, style = ready.loaded, ready.style
    # The run's split, unless told otherwise: the same records stay held out.
    prepared = prepare_data(data, skip_invalid=args.skip_invalid or saved.get("skip_invalid", False),
                            shuffle_seed=args.shuffle_seed if args.shuffle_seed is not None else saved.get("shuffle_seed"),
                            group_near_duplicates=args.group_near_duplicates or saved.get("group_near_duplicates", False),
                            fmt=saved.get("format", "auto"), columns=saved.get("columns"))
    entries = prepared.splits.by_name(args.split)
    out = Path(args.out) if args.out else (run.responses_file(args.split) if run else Path(f"{args.split}-responses.json"))
    started = time.perf_counter()
    respond(loaded, style, entries, out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            shots=args.few_shot, shot_pool=prepared.splits.train, repeat_stop=args.stop_on_repeat, beams=args.beams,
            length_penalty=args.length_penalty)
    print(f"Wrote {len(entries)} responses to {out} (and {out.with_suffix('.jsonl')}) in {time.perf_counter() - started:.0f} s")
    return 0


def register(subcommands) -> None:
    _register_generate(subcommands)
    _register_chat_and_serve(subcommands)
    _register_respond(subcommands)
