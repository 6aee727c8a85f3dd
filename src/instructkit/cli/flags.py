"""Command-line flags made from a config dataclass, and configs made from recipe files and flags.

Each field becomes one flag: its help is the field's `metadata["help"]` with the dataclass default
appended (never retyped), a bool field becomes --x / --no-x, a `list[str]` field a comma list and
an `X | None` field an X. Every flag defaults to None, so "given on the command line" is told
apart from "left to the recipe". Values are checked only by the config's `validate()`.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields

from instructkit.recipes import field_kind, read_recipe, typed_values

LIST_METAVAR = "A,B"


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _default(field: Field):
    return field.default_factory() if field.default is MISSING else field.default


def _shown(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def _help(field: Field, required: bool, default_text: str | None) -> str:
    text = field.metadata.get("help", "")
    choices = field.metadata.get("choices")
    if choices:
        text += f" ({', '.join(choices)})"
    if required:
        text += " (required: here or in the --config file)"
    elif default_text is not None:
        text += f" (default: {default_text})"
    elif _default(field) is not None:
        text += f" (default: {_shown(_default(field))})"
    return text.replace("%", "%%")  # argparse formats help text with %


def add_config_flags(parser: argparse.ArgumentParser, cls, *, skip: dict[str, str] | None = None,
                     required: tuple[str, ...] = (), default_text: str | None = None) -> None:
    """One flag per field of `cls`, in a group of their own, but the fields in `skip` (name: why
    it is no flag, said in the group's description). `required` fields show no default (the command
    needs them given); `default_text` replaces every shown default."""
    skip = skip or {}
    unflagged = "; ".join(f"{name}: {why}" for name, why in skip.items())
    group = parser.add_argument_group(f"settings ({cls.__name__}; the same names are keys of a --config file)",
                                      f"Fields without a flag: {unflagged}." if unflagged else None)
    for field in fields(cls):
        if field.name in skip:
            continue
        flag, kind = "--" + field.name.replace("_", "-"), field_kind(cls, field.name)[0]
        text = _help(field, field.name in required, default_text)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            if field.metadata.get("off_flag"):
                group.add_argument(field.metadata["off_flag"], dest=field.name, action="store_false", default=None,
                                   help=f"the same as --no-{flag[2:]}")
        elif kind is list:
            group.add_argument(flag, type=_comma_list, default=None, metavar=LIST_METAVAR, help=text)
        else:
            group.add_argument(flag, type=kind, default=None, help=text)


def given_flags(args: argparse.Namespace, cls, *, skip: tuple[str, ...] = ()) -> dict:
    """The fields of `cls` given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def add_config_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a recipe file (.yaml or .toml) of these settings, e.g. a run folder's recipe.yaml; "
                             "flags given here override it")


def config_layers(args: argparse.Namespace, cls, *, skip: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """(where, settings) of the --config file (if any), then of the command line."""
    layers = [(args.config, read_recipe(args.config))] if args.config else []
    return layers + [("the command line", given_flags(args, cls, skip=skip))]


def config_from_layers(cls, base: dict, layers: list[tuple[str, dict]], *, skip: tuple[str, ...] = ()):
    """A validated `cls` from `base` with each layer's settings over it, in order; a key that is
    not a field is a one-line error naming its file."""
    values = dict(base)
    for where, settings in layers:
        values.update(typed_values(cls, settings, where, skip=skip))
    return cls.from_dict(values).validate()
