"""`python -m bench [SUITE ...] [--quick]`: run benchmark suites, print tables, save JSON results.

Suites: peak, train, generate, quantized (generate's quantized-decoding rows, then startup), startup (chat's default
start timed: the decode step compiled in the background from an empty compile cache and from a filled one), kernels (batch-1
matmuls by weight format and kernel, behind quantized), smoothing (a rejected int8-MLP candidate,
measured on validation prompts), load (--only memory: the peak RSS of whole commands on a 1.5B shape), quality,
export, serve, dpo, scale, dedup, recipes, decoding. Default: all but quantized (inside generate), startup, kernels, smoothing,
recipes (six fine-tunings, 35 to 70 minutes, to choose the chapter-data recipe on validation responses) and decoding
(the test responses' decoding, chosen on the validation split of a finished main job: --run) and families
(SmolLM2-135M-Instruct and a random-weight Llama-3.2-1B shape: batch-1 decoding against llama.cpp Q8_0, LoRA training)
and base (LoRA on an fp32 / int8 / int4 base: a random-weight Qwen2.5-1.5B shape against HF + PEFT, and the final
validation loss on the two real models; --only speed or quality). --quick runs small models and few
steps (minutes), for checking the harness itself; its numbers are not the claims."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUITES = ("peak", "train", "base", "generate", "quantized", "startup", "kernels", "smoothing", "load", "quality", "export", "serve", "dpo", "scale", "dedup", "recipes", "decoding", "families")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", default=[s for s in SUITES if s not in ("recipes", "decoding", "quantized", "startup", "kernels", "smoothing", "families",
                                                                   "base")],
                        help=f"any of: {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="small models, few steps")
    parser.add_argument("--only", default=None,
                        help="train and families: only the configurations (train) or models (families) whose name "
                             "contains one of these comma-separated words, e.g. --only smollm2; base: speed or "
                             "quality; load: memory")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    parser.add_argument("--run", default=None,
                        help="quality: read this finished main-job folder instead of running three seeds; "
                             "export: export this run instead of the base model; decoding: the main-job folder "
                             "whose validation responses choose the decoding")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        print(f"bench: unknown suite(s) {', '.join(unknown)} (choose from {', '.join(SUITES)})", file=sys.stderr)
        return 2
    from bench import common

    results: dict = {"quick": args.quick}
    peak = None
    if "peak" in args.suites or "train" in args.suites:
        from bench import peak as peak_suite

        results["peak"] = peak_suite.run(args.quick)
        peak = results["peak"]["gflops"]
    if "train" in args.suites:
        from bench import train

        results["train"] = train.run(args.quick, peak_gflops=peak, repeats=args.repeats, only=args.only)
    if "generate" in args.suites:
        from bench import generate

        results["generate"] = generate.run(args.quick, repeats=args.repeats)
    elif "quantized" in args.suites:
        from bench import generate

        results["quantized"] = generate.quantized_decoding(args.quick, args.repeats or (1 if args.quick else 3))
    if "quantized" in args.suites or "startup" in args.suites:
        from bench import startup

        results["startup"] = startup.run(args.quick, repeats=args.repeats)
    if "kernels" in args.suites:
        from bench import kernels

        results["kernels"] = kernels.run(args.quick, repeats=args.repeats)
    if "smoothing" in args.suites:
        from bench import smoothing

        results["smoothing"] = smoothing.run(args.quick, repeats=args.repeats or (1 if args.quick else 3))
    if "families" in args.suites:
        from bench import families

        results["families"] = families.run(args.quick, repeats=args.repeats, only=args.only)
    if "base" in args.suites:
        from bench import base_quantize

        results["base"] = base_quantize.run(args.quick, repeats=args.repeats, only=args.only)
    if "load" in args.suites:
        from bench import load

        results["load"] = load.run(args.quick, repeats=args.repeats, only=args.only)
    if "export" in args.suites:
        from bench import export

        results["export"] = export.run(args.quick, repeats=args.repeats, run_dir=args.run)
    if "serve" in args.suites:
        from bench import serve

        results["serve"] = serve.run(args.quick, repeats=args.repeats)
    if "dpo" in args.suites:
        from bench import dpo

        results["dpo"] = dpo.run(args.run, quick=args.quick)
    if "scale" in args.suites:
        from bench import scale

        results["scale"] = scale.run(args.quick, repeats=args.repeats)
    if "dedup" in args.suites:
        from bench import dedup

        results["dedup"] = dedup.run(args.quick, repeats=args.repeats)
    if "recipes" in args.suites:
        from bench import recipes

        results["recipes"] = recipes.run(args.quick)
    if "decoding" in args.suites:
        from bench import decoding

        results["decoding"] = decoding.run(Path(args.run) if args.run else None, quick=args.quick)
    if "quality" in args.suites:
        from bench import quality

        results["quality"] = quality.run(Path(args.run) if args.run else None, quick=args.quick)
    path = common.save_results("quick" if args.quick else "full", results)
    print(f"\nRaw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
