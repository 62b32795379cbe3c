"""The `lorakit` command: a table from command name to the module that implements it.

Each command module exposes `register(subparsers)`, which adds its argparse parser (its flags from
a config dataclass, through `lorakit.options`) and sets `func` to a small adapter around a plain
typed function that Python users can call too; `func` returns an exit code, or anything else (a
result for Python callers) for 0. Only the
module of the command being run is imported, so `lorakit --help` and `lorakit bigram` stay fast.
`main` turns `UserError` into a one-line message and exit code 2: user mistakes never print a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lorakit.errors import UserError

# command name -> (module with `register(subparsers)`, one-line summary for `lorakit --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lorakit.train", "train an adapter on a frozen base"),
    "generate": ("lorakit.generate", "sample text with adapters at chosen scales (streamed)"),
    "eval": ("lorakit.evaluate", "perplexity of base vs adapted model on some data"),
    "demo": ("lorakit.demo", "train an adapter on a shipped corpus, compare it with the base and a full fine-tune"),
    "sweep": ("lorakit.sweep", "train a grid of recipes on your data: learning vs forgetting, size, time"),
    "merge": ("lorakit.export", "fold adapters into the base weights and write a plain transformers model"),
    "gguf": ("lorakit.gguf", "write adapters, bases or merged models as GGUF files for llama.cpp and Ollama"),
    "quantize": ("lorakit.quantize_cli", "write an NF4 (4-bit) copy of a base model for QLoRA training"),
    "combine": ("lorakit.algebra", "mix adapters into one new adapter: exact weighted sum, TIES, DARE, SVD"),
    "inspect": ("lorakit.inspection", "what an adapter holds: config, size, per-module rank, norm, spectrum"),
    "diff": ("lorakit.inspection", "which next-token predictions an adapter changes most"),
    "serve": ("lorakit.serve.app", "serve many adapters on one base: OpenAI-compatible API, batching, playground"),
    "bigram": ("lorakit.bigram.cli", "the count-based bigram model and its LoRA grids"),
}


class Parser(argparse.ArgumentParser):
    """argparse with its errors in lorakit's form: one line saying what to change, exit code 2.

    (argparse's own form is the whole usage block and then the error.) Subcommand parsers are made of
    the same class, so this holds for every command.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` fully registered and the others listed by name and summary."""
    parser = Parser(
        prog="lorakit",
        description="Low-Rank Adaptation for language models: train, use, combine and serve adapters.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    running = COMMANDS[command][0] if command in COMMANDS else None
    for name, (module_name, summary) in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).register(subparsers)
        elif module_name != running:  # a module may register several commands (inspection: inspect, diff)
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    huge_pages()
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def huge_pages() -> None:
    """Have PyTorch back its CPU tensors of 2 MB and more with transparent huge pages (`madvise`), unless the
    user set THP_MEM_ALLOC_ENABLE. Torch reads the variable once, at its first allocation, so this runs
    before any command imports it (in a process that had torch already, it changes nothing).

    Without them a fresh big tensor is faulted in 4 KB at a time, and glibc hands blocks over 32 MB
    straight from mmap: a training step pays that for every activation. On a 2-core AVX2 host, fp32,
    a (2048, 4864) tensor (a 0.5B base's MLP at batch 4x512): SiLU 28 -> 13 ms, a multiply 25 -> 8 ms
    (`benchmarks/huge_pages.py`); the 0.5B training step 1.17-1.39x PEFT's speed instead of 1.18-1.22x,
    at a lower peak (BENCHMARKS.md).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


if __name__ == "__main__":
    sys.exit(main())
