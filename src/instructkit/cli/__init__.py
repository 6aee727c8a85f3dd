"""The `instructkit` command: a thin table of subcommands over library functions.

One module per command group registers its subcommands and holds their handlers: data, train
(finetune, dpo, run), talk (generate, chat, serve, respond), export, evaluate and datatools
(dedup, leakage, synth); common holds the options several groups share and flags the flags made
from config dataclasses. User mistakes raise `UserError`; `main` prints them as one line on
stderr and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from instructkit.cli import data, datatools, evaluate, export, talk, train
from instructkit.cli.common import Parser
from instructkit.errors import UserError

GROUPS = (data, train, talk, evaluate, export, datatools)
MIN_TORCH = (2, 5)  # pyproject.toml says the same; tests/test_torch_minimum.py checks both


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="instructkit",
        description="Fine-tune pretrained causal language models to follow instructions, then measure them.",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands.required = True
    for group in GROUPS:
        group.register(subcommands)
    return parser


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
