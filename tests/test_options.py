"""Command-line flags from config dataclasses: every annotation's form, defaults shown once, bad fields loud."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorakit.options import add_options, default_of, option, options


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


@dataclass(kw_only=True)
class Example:
    data: Path = option("a required path")
    name: str | None = option("an optional string", default=None)
    steps: int = option("an int", default=3)
    rate: float = option("a float", default=0.5)
    fast: bool = option("a switch that is off by default", default=False)
    stop: bool = option("keep going instead", default=True)
    tidy: bool | None = option("undecided unless given", default=None)
    adapters: list[str] = option("repeatable", default_factory=list, flag="--adapter", metavar="PATH")
    prompts: list[str] | None = option("several values to one flag", default=None, nargs="+")
    scales: list[float] = option("one value, parsed", type=_floats, default_factory=lambda: [0.0, 1.0])
    file: Path = option("a positional argument", positional=True)
    out: Path = option("short and long", short="-o")


def _parse(argv: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    return Example(**options(parser.parse_args(argv), Example))


def test_each_annotation_becomes_its_flag():
    got = _parse(["f.txt", "--data", "d", "-o", "out", "--name", "x", "--steps", "7", "--rate", "2.5", "--fast",
                  "--no-stop", "--adapter", "a", "--adapter", "b", "--prompts", "p", "q", "--scales", "0,0.5"])
    assert got == Example(data=Path("d"), name="x", steps=7, rate=2.5, fast=True, stop=False, adapters=["a", "b"],
                          prompts=["p", "q"], scales=[0.0, 0.5], file=Path("f.txt"), out=Path("out"))


@pytest.mark.parametrize(("argv", "tidy"), [([], None), (["--tidy"], True), (["--no-tidy"], False)])
def test_an_undecided_switch_takes_both_forms(argv, tidy):
    assert _parse(["f.txt", "--data", "d", "--out", "o", *argv]).tidy is tidy


def test_defaults_come_from_the_fields():
    got = _parse(["f.txt", "--data", "d", "--out", "o"])
    assert got == Example(data=Path("d"), file=Path("f.txt"), out=Path("o"))


def test_help_shows_each_default_once_and_the_help_text(capsys):
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    text = " ".join(parser.format_help().split())
    assert "an int (default 3)" in text and "a float (default 0.5)" in text and "(default 0,1)" in text
    assert "--no-stop keep going instead" in text and "(default None)" not in text


def test_a_required_field_is_a_required_flag():
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    with pytest.raises(SystemExit):
        parser.parse_args(["f.txt", "--out", "o"])  # no --data


def test_an_annotation_without_a_command_line_form_fails_loudly():
    @dataclass
    class Odd:
        mapping: dict[str, int] = option("no flag for this", default_factory=dict)

    with pytest.raises(TypeError, match="no command-line form for annotation 'dict"):
        add_options(argparse.ArgumentParser(), Odd)


def test_a_plain_field_without_help_fails_loudly():
    @dataclass
    class Plain:
        steps: int = 3

    with pytest.raises(TypeError, match="not an option"):
        add_options(argparse.ArgumentParser(), Plain)


def test_default_of_reads_the_wrapped_function():
    def combine(adapters, method="linear", rank=None):
        return adapters

    assert default_of(combine, "method") == "linear" and default_of(combine, "rank") is None
    with pytest.raises(TypeError, match="no default"):
        default_of(combine, "adapters")
