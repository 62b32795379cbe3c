"""Command-line flags from typed dataclasses: each field's help is its --help, its default the flag's.

    @dataclass
    class EvalArgs:
        data: Path = option(".txt or .jsonl file to score")                       # required: --data
        adapter: list[str] = option("adapter directory ...", default_factory=list, metavar="PATH[:SCALE]")
        seq_len: int = option("tokens per scored row", default=256)               # --seq-len, "(default 256)"
        json: bool = option("print the result as JSON", default=False)           # a switch

    add_options(parser, EvalArgs)                   # one flag per field
    EvalArgs(**options(args, EvalArgs))             # and back, validated by the dataclass

How a field becomes a flag (its annotation decides; any other annotation is a TypeError, not a string):
- `int`, `float`, `str`, `Path` (or `... | None`): `--name VALUE`; required when the field has no default;
- `bool`: a switch, `--name` when the default is False, `--no-name` when it is True; `bool | None`
  with default None: both `--name` and `--no-name`, None when neither is given (the command decides);
- `list[str]` / `list[Path]` / `list[float]`: a repeatable flag (`--adapter a --adapter b`), with
  `nargs="+"` one flag taking several values, with `type=` one value that `type` parses into the list;
  `positional=True` makes any field a positional argument.
No torch import here: the light commands (bigram, --help) use it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path

# a field's annotation (a string under `from __future__ import annotations`) -> (argparse type, is a list)
_TYPES: dict[str, tuple[Callable, bool]] = {
    "int": (int, False), "float": (float, False), "str": (str, False), "Path": (Path, False),
    "list[str]": (str, True), "list[Path]": (Path, True), "list[float]": (float, True),
}


def option(text: str, *, default=dataclasses.MISSING, default_factory=dataclasses.MISSING, metavar: str | None = None,
           positional: bool = False, nargs: str | None = None, flag: str | None = None, short: str | None = None,
           type: Callable | None = None, required: bool | None = None, show_default: bool = True):
    """A config dataclass field whose `text` is its command-line --help (one source for both).

    `metavar`, `nargs`, `short` (e.g. "-o") and `type` (a parser for the value) pass to argparse;
    `flag` names the flag when it is not the field's name (`adapters` as a repeated `--adapter`);
    `required=True` makes a flag with a default (a list) required on the command line;
    `show_default=False` leaves "(default ...)" out of the help (when the text says it better).
    For a switch that defaults to True the flag is `--no-NAME`, and `text` says what that does.
    """
    meta = {"help": text, "metavar": metavar, "positional": positional, "nargs": nargs, "flag": flag,
            "short": short, "type": type, "required": required, "show_default": show_default}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def default_of(function: Callable, parameter: str):
    """The default of `function`'s `parameter`, for a command's field that wraps a library function:
    `rank: int | None = option("...", default=default_of(combine, "rank"))` keeps one source."""
    default = inspect.signature(function).parameters[parameter].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{function.__name__}() has no default for {parameter!r}")
    return default


def add_options(parser: argparse.ArgumentParser, config: type, skip: tuple[str, ...] = ()) -> None:
    """One flag (or positional argument) per field of the dataclass `config` made with `option`."""
    for f in dataclasses.fields(config):
        if f.name not in skip:
            parser.add_argument(*_names(f), **_argument(config, f))


def options(args: argparse.Namespace, config: type, skip: tuple[str, ...] = ()) -> dict:
    """The parsed values of `add_options`' flags, by field name: `config(**options(args, config), ...)`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if f.name not in skip}


def add_command(subparsers, name: str, summary: str, description: str, run: Callable, *configs: type):
    """A subcommand whose flags are the fields of `configs` and that calls `run(config, ...)` with one
    instance of each, built from the parsed flags; `description` (examples included) shows as written."""
    parser = subparsers.add_parser(name, help=summary, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    for config in configs:
        add_options(parser, config)
    parser.set_defaults(func=lambda args: run(*(config(**options(args, config)) for config in configs)))
    return parser


def flag(name: str) -> str:
    """The flag of field `name`: 'max_new_tokens' -> '--max-new-tokens'."""
    return "--" + name.replace("_", "-")


def _names(f: dataclasses.Field) -> list[str]:
    meta = f.metadata
    if meta.get("positional"):
        return [f.name]
    name = meta.get("flag") or flag(f.name)
    if _annotation(f) == "bool" and f.default is True:
        name = "--no-" + name.removeprefix("--")
    return ([meta["short"]] if meta.get("short") else []) + [name]


def _argument(config: type, f: dataclasses.Field) -> dict:
    meta = f.metadata
    if "help" not in meta:
        raise TypeError(f"{config.__name__}.{f.name} is not an option(...) field; it needs its help text")
    text = meta["help"].replace("%", "%%")
    annotation = _annotation(f)
    kw: dict = {"dest": f.name} if not meta.get("positional") else {}
    if annotation == "bool" and f.default is None:  # undecided unless given: --name / --no-name
        return {**kw, "action": argparse.BooleanOptionalAction, "default": None, "help": text}
    if annotation == "bool":
        return {**kw, "action": "store_false" if f.default is True else "store_true", "help": text}
    if annotation not in _TYPES:
        raise TypeError(f"{config.__name__}.{f.name}: no command-line form for annotation {annotation!r}; "
                        f"use one of bool, {', '.join(_TYPES)} (or '... | None')")
    kind, many = _TYPES[annotation]
    missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    required = missing if meta.get("required") is None else meta["required"]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else (
        None if missing else f.default)
    kw["type"] = meta.get("type") or kind
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if many and meta.get("type") and not meta.get("nargs"):
        pass  # one value that `type` parses into the list, e.g. "0,0.5,1"
    elif many or meta.get("nargs"):
        if meta.get("nargs") or meta.get("positional"):
            kw["nargs"] = meta.get("nargs") or "+"
        else:
            kw["action"] = "append"
    if meta.get("positional"):
        return {**kw, "help": text}
    shown = "" if default in (None, []) or not meta.get("show_default", True) else f" (default {_shown(default)})"
    return {**kw, "required": required, "default": default, "help": text + shown}


def _annotation(f: dataclasses.Field) -> str:
    """The field's annotation as written, without a trailing '| None'."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return text.removesuffix(" | None")


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(_shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
