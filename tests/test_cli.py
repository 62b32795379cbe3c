"""The command table: every command's help renders, and `lorakit --help` imports no heavy library."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorakit.cli import COMMANDS, main


# command groups show their examples on their subcommands
HELP_ARGS = [[c] if c != "bigram" else [c, "sample"] for c in COMMANDS]


@pytest.mark.parametrize("args", HELP_ARGS, ids=" ".join)
def test_every_command_has_help_with_an_example(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"lorakit {' '.join(args)}" in out and "example" in out


def test_top_level_help_lists_commands_without_importing_torch():
    code = ("import sys; from lorakit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in COMMANDS)
    assert out.strip().endswith("False")


def test_public_names_are_the_functions_whatever_was_imported_first():
    code = ("import lorakit.io, lorakit.train, lorakit\n"
            "print(all(callable(getattr(lorakit, n)) or isinstance(getattr(lorakit, n), type) for n in lorakit.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
