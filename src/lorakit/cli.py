"""The `lorakit` command: a table from command name to a module that registers it.

Each command module exposes `register(subparsers)`, which adds its argparse parser and sets
`func` to a plain typed function that Python users can call too. `main` turns `UserError` into a
one-line message and exit code 2, so user mistakes never print a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit.errors import UserError

# command name -> module with `register(subparsers)`; imported lazily so `lorakit --help` is fast.
COMMANDS: dict[str, str] = {
    "train": "lorakit.train",
    "generate": "lorakit.generate",
    "eval": "lorakit.evaluate",
    "bigram": "lorakit.bigram.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="Low-Rank Adaptation for language models: train, use, combine and serve adapters.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
