"""`python -m bench [SUITE ...] [--quick]`: run benchmark suites, print tables, save JSON results.

Suites: peak, train, generate, load, quality. Default: all. --quick runs small models and few
steps (minutes), for checking the harness itself; its numbers are not the claims."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUITES = ("peak", "train", "generate", "load", "quality")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", default=list(SUITES), help=f"any of: {', '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="small models, few steps")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    parser.add_argument("--run", default="runs/builtin", help="run folder for the quality suite")
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

        results["train"] = train.run(args.quick, peak_gflops=peak, repeats=args.repeats)
    if "generate" in args.suites:
        from bench import generate

        results["generate"] = generate.run(args.quick, repeats=args.repeats)
    if "load" in args.suites:
        from bench import load

        results["load"] = load.run(args.quick)
    if "quality" in args.suites:
        from bench import quality

        results["quality"] = quality.run(Path(args.run))
    path = common.save_results("quick" if args.quick else "full", results)
    print(f"\nRaw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
