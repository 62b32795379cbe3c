"""`lorakit bigram ...` end to end, in process: one session of commands, then the user errors."""

from __future__ import annotations

import pytest

from lorakit.cli import main

GENERAL = (
    "The cat sat on the mat. I saw the dog. I saw the mat. "
    "The dog saw a bird. A bird sat on a tree. I like the cat."
)
DOMAIN = "I saw a red cat. I saw the red dog."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigram")
    (d / "general.txt").write_text(GENERAL)
    (d / "domain.txt").write_text(DOMAIN)
    (d / "held.txt").write_text("I saw the red dog. The cat sat on the mat.")
    (d / "other.txt").write_text("Completely different words live here.")
    assert main(["bigram", "train", str(d / "general.txt"), "-o", str(d / "base.bigram")]) == 0
    assert main(["bigram", "adapt", str(d / "base.bigram"), str(d / "domain.txt"), "-o", str(d / "d.lora")]) == 0
    assert main(["bigram", "train", str(d / "other.txt"), "-o", str(d / "other.bigram")]) == 0
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["bigram", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_adapt_reports_size_against_the_base(files, capsys):
    code, out, _ = run(capsys, "adapt", str(files / "base.bigram"), str(files / "domain.txt"),
                       "-o", str(files / "again.lora"))
    assert code == 0
    assert "9 rows of 15" in out and "new words: 1" in out and "% of" in out


def test_sample_is_seeded(files, capsys):
    argv = ("sample", str(files / "base.bigram"), "--lora", f"{files / 'd.lora'}:2.0",
            "--start", "i", "-n", "20", "--seed", "7")
    first, second = run(capsys, *argv), run(capsys, *argv)
    assert first[0] == 0 and first == second
    assert first[1].startswith("i ")


def test_show_prints_the_row_before_and_after(files, capsys):
    code, out, _ = run(capsys, "show", str(files / "base.bigram"), "--row", "Saw",  # tokenized
                       "--lora", f"{files / 'd.lora'}:2")
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert code == 0
    assert lines["the"][:3] == ["2", "2", "4"] and lines["a"][:3] == ["1", "2", "3"]


def test_diff_lists_rows_and_writes_a_heatmap(files, capsys):
    png = files / "rows.png"
    code, out, _ = run(capsys, "diff", str(files / "base.bigram"), str(files / "d.lora"),
                       "--top", "3", "--plot", str(png))
    assert code == 0
    assert out.splitlines()[1].startswith("red (new)")
    assert len(out.splitlines()) == 1 + 3 + 1  # header, 3 rows, "wrote ..."
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_eval_sweeps_scales_and_draws_the_curve(files, capsys):
    png = files / "curve.png"
    code, out, _ = run(capsys, "eval", str(files / "base.bigram"), str(files / "held.txt"),
                       "--lora", f"{files / 'd.lora'}:1.0", "--curve", str(files / "domain.txt"),
                       "--fractions", "0.5,1", "--plot", str(png))
    assert code == 0
    for label in ("base alone", "base + 0.5×d.lora", "base + 2×d.lora", "domain tokens"):
        assert label in out
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("sub", ["train", "adapt", "sample", "diff", "eval", "show"])
def test_every_subcommand_has_an_example_in_its_help(sub, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bigram", sub, "--help"])
    assert exit_info.value.code == 0
    assert f"lorakit bigram {sub} " in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "{d}/empty.txt", "-o", "{d}/x.bigram"], "contains no words"),
        (["train", "{d}/binary.bin", "-o", "{d}/x.bigram"], "binary"),
        (["train", "{d}/nope.txt", "-o", "{d}/x.bigram"], "no such text file"),
        (["train", "{d}/general.txt", "-o", "{d}/no/dir/x.bigram"], "does not exist"),
        (["sample", "{d}/other.bigram", "--lora", "{d}/d.lora"], "made for another base grid"),
        (["sample", "{d}/base.bigram", "--start", "zebra"], "'zebra' is not in the vocabulary"),
        (["sample", "{d}/base.bigram", "--lora", "{d}/d.lora:two"], "PATH:SCALE"),
        (["sample", "{d}/base.bigram", "--lora", "{d}/d.lora:-1"], "scale must be"),
        (["sample", "{d}/d.lora"], "pass the base grid first"),
        (["eval", "{d}/base.bigram", "{d}/held.txt", "--smoothing", "0"], "smoothing > 0"),
        (["show", "{d}/base.bigram", "--row", "zebra"], "'zebra' is not in the vocabulary"),
        (["show", "{d}/base.bigram", "--row", "i saw"], "give one word"),
        (["eval", "{d}/base.bigram", "{d}/held.txt", "--plot", "{d}/c.png"], "add --curve"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(files, capsys, argv, message):
    (files / "empty.txt").write_text("")
    (files / "binary.bin").write_bytes(bytes(range(256)))
    code, out, err = run(capsys, *(a.format(d=files) for a in argv))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
