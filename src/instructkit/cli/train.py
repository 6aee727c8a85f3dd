"""Training commands: finetune, dpo and run (the main job).

Their settings are flags generated from the config dataclasses (cli/flags.py); a `--config` recipe
file goes under the flags, and a resumed run's saved config under both.
"""

from __future__ import annotations

import argparse
import json

from instructkit.cli.common import (add_beam_options, add_judge_options, judge_config, judge_exit_status, print_evaluation,
                                   print_report_files)
from instructkit.cli.flags import add_config_file_option, add_config_flags, config_from_layers, config_layers, given_flags
from instructkit.errors import UserError
from instructkit.recipes import RESPONSES
from instructkit.runs import RunFolder
from instructkit.train.config import DPOConfig, TrainConfig

# Fields that are no flag: each command says why.
FINETUNE_NO_FLAG = {"data_sha256": "recorded by finetune from the data it reads"}
DPO_NO_FLAG = {"method": "always dpo", "start": "given by --run/--sft-run or --model"}
# Flags of these commands that are no config field.
FINETUNE_OWN_FLAGS = ("resume", "nproc", "config")
DPO_OWN_FLAGS = ("resume", "nproc", "config", "run", "model")


def register(subcommands) -> None:
    _register_finetune(subcommands)
    _register_dpo(subcommands)
    _register_run(subcommands)


def _add_launch_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help=f"continue an interrupted {what}")
    parser.add_argument("--nproc", type=int, default=None,
                        help="data-parallel processes on this machine (torchrun, standalone, DDP); --batch-size is per process")
    add_config_file_option(parser)


def _register_finetune(subcommands) -> None:
    tune = subcommands.add_parser("finetune", help="fine-tune a model on instruction data (full or LoRA)")
    _add_launch_options(tune, "run")
    add_config_flags(tune, TrainConfig, skip=FINETUNE_NO_FLAG, required=("data", "out"))
    tune.set_defaults(handler=cmd_finetune)


def _register_dpo(subcommands) -> None:
    pref = subcommands.add_parser("dpo", help="preference tuning (DPO) of a fine-tuned model",
                                  description="Direct Preference Optimization, the book's defaults. Unlike the book, "
                                              "each response gets the end token appended (--no-append-eos: as the book), "
                                              "so the model learns where to stop.")
    pref.add_argument("--run", "--sft-run", dest="run", default=None,
                      help="a finished fine-tuning run to start from (its prompt style is used); under a torchrun you "
                           "start yourself write --sft-run, since torchrun's parser takes --run for its --run-path")
    pref.add_argument("--model", default=None, help="or any model spec")
    _add_launch_options(pref, "DPO run")
    add_config_flags(pref, DPOConfig, skip=DPO_NO_FLAG, required=("data", "out"))
    pref.set_defaults(handler=cmd_dpo)


def _register_run(subcommands) -> None:
    run = subcommands.add_parser(
        "run", help="the main job: fine-tune, respond on the test split, evaluate, report",
        description="The main job. Its settings default to the data's recipe: src/instructkit/recipes/builtin.yaml "
                    "on the built-in data (--data builtin, the default), chapter.yaml on any other; a --config file "
                    "goes over that recipe and flags over both. Without --out the run folder is named after the data.")
    add_config_file_option(run)
    run.add_argument("--max-new-tokens", type=int, default=None,
                     help="per test response (default: twice the longest training response, at most 256)")
    add_beam_options(run, None, "the recipe's: 1 (greedy) on the built-in data, 4 on any other")
    run.add_argument("--base-max-new-tokens", type=int, default=64, help="the base model rarely stops; cap it")
    run.add_argument("--baseline", default=None,
                     help="another system's responses to the test split (e.g. the book's, "
                          "instruction-data-with-response.json), compared with ours in the report")
    run.add_argument("--baseline-label", default=None, help="its name in the report")
    run.add_argument("--base-shots", type=int, default=3,
                     help="solved training examples before each question for the base model (default 3; its answer is "
                          "the first line it writes)")
    add_judge_options(run)
    add_config_flags(run, TrainConfig, skip=FINETUNE_NO_FLAG, default_text="the recipe's")
    run.set_defaults(handler=cmd_run)


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


def _require(layers: list[tuple[str, dict]], names: tuple[str, ...], message: str) -> None:
    given = {name for _, settings in layers for name, value in settings.items() if value}
    if not set(names) <= given:
        raise UserError(message)


def _say_layers(layers: list[tuple[str, dict]]) -> None:
    """Where the settings came from: the recipe file, and what the command line set over it."""
    for where, settings in layers:
        if where == "the command line":
            print(f"Set on the command line: {', '.join(settings) or 'nothing'}")
        else:
            print(f"Recipe: {where} ({len(settings)} settings)")


def cmd_finetune(args: argparse.Namespace) -> int:
    from instructkit.train.finetune import finetune, load_run_config

    relaunched = _relaunch_for_nproc(args)
    if relaunched is not None:
        return relaunched
    layers = config_layers(args, TrainConfig)
    if args.resume:
        # The saved config under what is given here: finetune refuses a difference.
        saved = load_run_config(RunFolder(args.resume)).to_dict()
        config = config_from_layers(TrainConfig, saved, layers + [("--resume", {"out": args.resume})], skip=(RESPONSES,))
        finetune(config, resume=True)
        return 0
    _require(layers, ("data", "out"), "finetune needs --data and --out, on the command line or in a --config file "
                                      "(or --resume RUN_DIR)")
    config = config_from_layers(TrainConfig, TrainConfig().to_dict(), layers, skip=(RESPONSES,))
    _say_layers(layers)
    print("Config:", json.dumps(config.to_dict()))
    finetune(config)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from instructkit.train.dpo import dpo

    relaunched = _relaunch_for_nproc(args)
    if relaunched is not None:
        return relaunched
    if args.run and args.model:
        raise UserError("dpo needs one of --run SFT_RUN or --model SPEC, not both")
    layers = config_layers(args, DPOConfig)
    if args.run or args.model:
        layers.append(("--run/--model", {"start": args.run or args.model}))
    if args.resume:
        saved = DPOConfig.from_dict(RunFolder(args.resume).config()).to_dict()
        config = config_from_layers(DPOConfig, saved, layers + [("--resume", {"out": args.resume})])
    else:
        _require(layers, ("start", "data", "out"), "dpo needs --run SFT_RUN or --model SPEC, --data PREFS and --out R2, "
                                                   "on the command line or in a --config file (or --resume R2)")
        config = config_from_layers(DPOConfig, DPOConfig().to_dict(), layers)
        _say_layers(layers)
    dpo(config, resume=bool(args.resume))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job (main_job.py runs it; recipes/ holds its recipes)."""
    from instructkit.main_job import MainJob, run_main_job

    job = MainJob(train=given_flags(args, TrainConfig), config=args.config, max_new_tokens=args.max_new_tokens,
                  beams=args.beams, length_penalty=args.length_penalty, base_max_new_tokens=args.base_max_new_tokens,
                  base_shots=args.base_shots, judge=judge_config(args), baseline=args.baseline,
                  baseline_label=args.baseline_label).validate()
    result = run_main_job(job)
    print_evaluation(result)
    print_report_files(job.recipe().out)
    print(f"Wall time: {result['wall_seconds']:.0f} s")
    return judge_exit_status(result)
