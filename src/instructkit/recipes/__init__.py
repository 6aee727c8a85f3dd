"""Recipe files: a training command's config as a YAML (or TOML) file of its fields.

`instructkit finetune|dpo|run --config FILE` reads one; every run folder holds its resolved recipe
(recipe.yaml, written with config.json), which passed back with `--config` repeats the run. The
main job's own recipes ship beside this module: builtin.yaml (the built-in data) and chapter.yaml
(the chapter's data and any other).

This module knows files and field types only, never a particular config: the caller hands it the
dataclass, so the run folder (runs.py) can write recipes without importing the training package.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from instructkit.errors import UserError

RECIPE_FILE = "recipe.yaml"
# Not settings but records of a run (data_sha256: its data's checksum, set by finetune): left out
# of a saved recipe so that it can start a new run on the same or on edited data.
NOT_RECIPE = ("data_sha256",)
# The main job's settings that are not training ones (how the test split is answered); finetune
# reads recipes holding them and leaves them to `instructkit run`.
RESPONSES = "responses"


def shipped(name: str) -> Path:
    """One of the recipes shipped with the package: builtin or chapter."""
    return Path(__file__).with_name(f"{name}.yaml")


def read_recipe(path: str | Path) -> dict:
    """The mapping in a .yaml/.yml or .toml file, in one line on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the recipe ({type(exc).__name__}: {exc})") from None
    values = _parse(path, text)
    if not isinstance(values, dict):
        raise UserError(f"{path}: a recipe must be a mapping of settings (name: value), got {type(values).__name__}")
    return values


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise UserError(f"{path}: TOML recipes need Python 3.11 or newer (tomllib); write it as YAML") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: not valid TOML ({exc})") from None
    if suffix not in (".yaml", ".yml"):
        raise UserError(f"{path}: a recipe is a .yaml, .yml or .toml file")
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None


def field_kind(cls, name: str) -> tuple[type, bool]:
    """A dataclass field's base type (bool, int, float, str or list) and whether None is allowed."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(arg for arg in args if arg is not type(None))
    return (typing.get_origin(hint) or hint), optional


def typed_values(cls, values: dict, where: str, *, skip: tuple[str, ...] = ()) -> dict:
    """`values` checked against the fields of `cls`: an unknown key or a value of the wrong type is
    a one-line error naming `where` and the key. Numbers written as text ("5e-5", which YAML 1.1
    reads as a string) become numbers; a comma string becomes a list."""
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key in skip:
            continue
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r} (not a setting of {cls.__name__})")
        out[key] = _typed(cls, key, value, where)
    return out


def _typed(cls, key: str, value: Any, where: str) -> Any:
    kind, optional = field_kind(cls, key)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is list and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    elif kind is list and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              list: "a list of strings"}[kind]
    raise UserError(f"{where}: {key}: expected {wanted}{' or null' if optional else ''}, got {value!r}")


def recipe_text(config: dict) -> str:
    """A resolved config as a recipe file: every setting, in the config's order."""
    import yaml

    command = "dpo" if config.get("method") == "dpo" else "finetune"
    settings = {key: value for key, value in config.items() if key not in NOT_RECIPE}
    return (f"# The resolved recipe of this run. `instructkit {command} --config recipe.yaml --out OTHER` repeats it;\n"
            "# a flag on the command line overrides the setting it names.\n"
            + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
