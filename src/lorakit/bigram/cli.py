"""`lorakit bigram ...`: each subcommand is a plain typed function `cmd_*`, callable from Python too."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.bigram.evaluate import (
    DEFAULT_FACTORS,
    DEFAULT_FRACTIONS,
    DEFAULT_SMOOTHING,
    CurvePoint,
    Score,
    data_curve,
    scale_sweep,
)
from lorakit.bigram.io import load_grid, load_lora, save_grid, save_lora
from lorakit.bigram.model import (
    Grid,
    LoraGrid,
    adapt_grid,
    check_lora,
    check_scale,
    combine,
    sample,
    train_grid,
)
from lorakit.bigram.report import RowChange, RowEntry, probability_table, row_changes, row_entries
from lorakit.bigram.tokens import BOUNDARY, detokenize, read_text, tokenize
from lorakit.errors import UserError
from lorakit.files import check_output
from lorakit.options import add_command, option


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """'pirate.lora:2.0' -> (Path('pirate.lora'), 2.0); a bare path means scale 1."""
    path, sep, scale_text = spec.rpartition(":")
    if not sep or Path(spec).is_file():  # no colon, or a path that itself holds one
        return Path(spec), 1.0
    try:
        scale = float(scale_text)
    except ValueError:
        raise UserError(f"--lora {spec!r}: write PATH or PATH:SCALE, e.g. pirate.lora:2.0") from None
    if not path:
        raise UserError(f"--lora {spec!r}: the path is missing; write PATH:SCALE, e.g. pirate.lora:2.0")
    return Path(path), check_scale(scale)


def load_adapters(base: Grid, specs: list[str]) -> list[tuple[LoraGrid, float]]:
    adapters = []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        lora = load_lora(path)
        check_lora(base, lora, str(path))  # fail here, naming the file, not deep inside combine
        adapters.append((lora, scale))
    return adapters


BASE_HELP = "base grid file written by `lorakit bigram train`"


def lora_option():
    return option("a LoRA grid and its scale (default 1); repeat to mix several", default_factory=list,
                  flag="--lora", metavar="PATH[:SCALE]")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers separated by commas, got {text!r}")
    return values


def _size(n_bytes: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, like the text sizes users quote)."""
    for unit in ("B", "KB", "MB"):
        if n_bytes < 999.95:  # so 999,999 B reads 1.0 MB, not 1000.0 KB
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"


@dataclass(kw_only=True)
class TrainGridConfig:
    """`lorakit bigram train`."""

    text: Path = option("UTF-8 text file", positional=True)
    out: Path = option("base grid file to write", short="-o")


def cmd_train(config: TrainGridConfig) -> Grid:
    text, out = config.text, config.out
    check_output(out, "-o", make_parents=False, inputs={"text": text})
    start = time.perf_counter()
    content = read_text(text)
    grid = train_grid(content)
    save_grid(grid, out)
    print(
        f"wrote {out}: {len(grid.vocab):,} words, {len(grid.counts):,} distinct word pairs, "
        f"{_size(out.stat().st_size)} ({_size(len(content.encode()))} of text in "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return grid


@dataclass(kw_only=True)
class AdaptConfig:
    """`lorakit bigram adapt`."""

    base: Path = option(BASE_HELP, positional=True)
    text: Path = option("UTF-8 domain text file", positional=True)
    out: Path = option("LoRA grid file to write", short="-o")


def cmd_adapt(config: AdaptConfig) -> LoraGrid:
    base_path, text, out = config.base, config.text, config.out
    check_output(out, "-o", make_parents=False, inputs={"base grid": base_path, "text": text})
    base = load_grid(base_path)
    lora = adapt_grid(base, read_text(text))
    save_lora(lora, out)
    lora_bytes, base_bytes = out.stat().st_size, base_path.stat().st_size
    print(
        f"wrote {out}: {len(lora.row_ids()):,} rows of {len(base.vocab) + len(lora.extra_vocab):,}, "
        f"{len(lora.counts):,} word pairs, new words: {len(lora.extra_vocab):,}; "
        f"{_size(lora_bytes)} = {100 * lora_bytes / base_bytes:.2g}% of {base_path} "
        f"({_size(base_bytes)})"
    )
    return lora


@dataclass(kw_only=True)
class SampleConfig:
    """`lorakit bigram sample`."""

    base: Path = option(BASE_HELP, positional=True)
    loras: list[str] = lora_option()
    start: str | None = option("first word(s); default: a sentence start", default=None)
    n: int = option("words to draw", default=30, flag="-n")
    seed: int = option("random seed", default=0)
    smoothing: float = option("add this to every cell of a row before drawing", default=0.0)


def cmd_sample(config: SampleConfig) -> str:
    base = load_grid(config.base)
    mix = combine(base, load_adapters(base, config.loras))
    text = detokenize(sample(mix, config.start, config.n, config.seed, config.smoothing))
    print(text)
    return text


@dataclass(kw_only=True)
class GridDiffConfig:
    """`lorakit bigram diff`."""

    base: Path = option(BASE_HELP, positional=True)
    lora: str = option("LoRA grid file, scale 1 unless given", positional=True, metavar="LORA[:SCALE]")
    top: int = option("rows to list", default=20)
    plot: Path | None = option("heatmap PNG of the top rows", default=None)


def cmd_diff(config: GridDiffConfig) -> list[RowChange]:
    lora_spec, top, plot = config.lora, config.top, config.plot
    if plot is not None:
        check_output(plot, "--plot", make_parents=False)
    base = load_grid(config.base)
    [(lora, scale)] = load_adapters(base, [lora_spec])
    changes = row_changes(base, lora, scale, top)
    print(f"{'word':<14} {'weight':>7} {'JS bits':>7}  gained / lost next words (Δ probability)")
    for c in changes:
        gained = " ".join(f"+{w}({d:+.2f})" for w, d in c.gained)
        lost = " ".join(f"-{w}({d:+.2f})" for w, d in c.lost)
        label = c.word + (" (new)" if c.new_word else "")
        print(f"{label:<14} {c.weight:>7.3f} {c.divergence:>7.3f}  {gained}  {lost}".rstrip())
    if plot is not None:
        from lorakit.bigram import plots

        top_rows = changes[:15]
        cols, before, after = probability_table(base, lora, scale, [c.word for c in top_rows])
        labels = [c.word + (" (new)" if c.new_word else "") for c in top_rows]
        plots.heatmap(labels, cols, before, after, plot, f"{lora_spec}: rows that change most")
        print(f"wrote {plot}")
    return changes


def _score_line(label: str, s: Score) -> str:
    return f"{label:<34} {s.log_likelihood / s.pairs:>12.3f} {s.perplexity:>11.1f}"


@dataclass(kw_only=True)
class GridEvalConfig:
    """`lorakit bigram eval`."""

    base: Path = option(BASE_HELP, positional=True)
    held_out: Path = option("UTF-8 text to score", positional=True)
    loras: list[str] = lora_option()
    smoothing: float = option("add-k smoothing, must be > 0", default=DEFAULT_SMOOTHING)
    factors: list[float] = option("multiply all LoRA scales by each of these", type=_floats,
                                  default_factory=lambda: list(DEFAULT_FACTORS))
    curve: Path | None = option("also score base, from-scratch and base+LoRA on growing prefixes of this text",
                                default=None, metavar="DOMAIN.txt")
    fractions: list[float] = option("prefix sizes for --curve", type=_floats, default_factory=lambda: list(DEFAULT_FRACTIONS))
    curve_scale: float = option("LoRA scale on the curve", default=1.0)
    plot: Path | None = option("PNG of the --curve", default=None)


def cmd_eval(config: GridEvalConfig) -> tuple[list[tuple[float, Score]], list[CurvePoint]]:
    """Print the scale sweep (and the data curve); return both for Python callers."""
    base_path, held_out, loras, smoothing = config.base, config.held_out, config.loras, config.smoothing
    factors, curve, fractions, curve_scale, plot = (config.factors, config.curve, config.fractions,
                                                    config.curve_scale, config.plot)
    if plot is not None and curve is None:
        raise UserError("--plot draws the --curve; add --curve DOMAIN.txt")
    if plot is not None:
        check_output(plot, "--plot", make_parents=False)
    base = load_grid(base_path)
    adapters = load_adapters(base, loras)
    held = read_text(held_out)
    sweep = scale_sweep(base, adapters, held, factors if adapters else [0.0], smoothing)
    first = sweep[0][1]
    print(f"{held_out}: {first.pairs:,} word pairs scored, {first.skipped:,} skipped (a word in "
          f"no grid's vocabulary); add-{smoothing:g} smoothing")
    print(f"{'model':<34} {'loglik/pair':>12} {'perplexity':>11}")
    names = [parse_lora_spec(spec)[0].name for spec in loras]
    for factor, s in sweep:
        mixed = " + ".join(f"{factor * scale:g}×{name}"
                           for name, (_, scale) in zip(names, adapters, strict=True))
        print(_score_line("base alone" if factor == 0 else f"base + {mixed}", s))
    points: list[CurvePoint] = []
    if curve is not None:
        domain = read_text(curve)
        points = data_curve(base, domain, held, curve_scale, fractions or DEFAULT_FRACTIONS, smoothing)
        print(f"\ncurve over {curve} (prefixes; held-out perplexity, lower is better):")
        print(f"{'domain tokens':>13} {'base':>9} {'scratch':>9} {'base+LoRA':>9}")
        for p in points:
            print(f"{p.domain_tokens:>13,} {p.base.perplexity:>9.1f} {p.scratch.perplexity:>9.1f} "
                  f"{p.lora.perplexity:>9.1f}")
        if plot is not None:
            from lorakit.bigram import plots

            plots.curve(points, plot, curve_scale)
            print(f"wrote {plot}")
    return sweep, points


@dataclass(kw_only=True)
class ShowConfig:
    """`lorakit bigram show`."""

    base: Path = option(BASE_HELP, positional=True)
    row: str = option("the current word")
    loras: list[str] = lora_option()
    top: int = option("next words to list", default=20)


def cmd_show(config: ShowConfig) -> list[RowEntry]:
    base_path, row, loras, top = config.base, config.row, config.loras, config.top
    # The same rules as training ("Saw" -> "saw"); "<s>" names the sentence-start row.
    tokens = [BOUNDARY] if row.strip() == BOUNDARY else [t for t in tokenize(row) if t != BOUNDARY]
    if len(tokens) != 1:
        raise UserError(f"--row {row!r} is {len(tokens)} tokens {tokens}; give one word")
    base = load_grid(base_path)
    entries = row_entries(base, tokens[0], load_adapters(base, loras), top)
    print(f"row {tokens[0]!r}: next word, counts before/after, probabilities before/after")
    print(f"{'next':<14} {'base':>8} {'+LoRA':>8} {'after':>8} {'P before':>9} {'P after':>9}")
    for e in entries:
        print(f"{e.next_word:<14} {e.base:>8g} {e.lora:>8g} {e.base + e.lora:>8g} "
              f"{e.p_before:>9.3f} {e.p_after:>9.3f}")
    return entries


# subcommand -> (summary, example, config, command)
SUBCOMMANDS = {
    "train": ("count the base grid of a text", "lorakit bigram train general.txt -o base.bigram",
              TrainGridConfig, cmd_train),
    "adapt": ("count a LoRA grid of domain text against a base grid",
              "lorakit bigram adapt base.bigram pirate.txt -o pirate.lora", AdaptConfig, cmd_adapt),
    "sample": ("generate text from base + Σ scale × LoRA",
               'lorakit bigram sample base.bigram --lora pirate.lora:2.0 --start "i" -n 30 --seed 7',
               SampleConfig, cmd_sample),
    "diff": ("the words whose next-word distribution a LoRA grid moves most",
             "lorakit bigram diff base.bigram pirate.lora --top 20 --plot rows.png", GridDiffConfig, cmd_diff),
    "eval": ("held-out log-likelihood and perplexity, scale sweep, data curve",
             "lorakit bigram eval base.bigram --lora pirate.lora:1.0 held_out.txt --curve pirate.txt --plot curve.png",
             GridEvalConfig, cmd_eval),
    "show": ("one row of the grid as counts, before and after LoRA grids",
             "lorakit bigram show base.bigram --row saw --lora pirate.lora", ShowConfig, cmd_show),
}


def register(subparsers) -> None:
    bigram = subparsers.add_parser(
        "bigram",
        help="bigram count grids and their LoRA grids (the readable LoRA)",
        description="A language model that is a grid of word-pair counts, adapted to a domain by a "
        "grid of extra counts. See docs/bigram.md.",
    )
    sub = bigram.add_subparsers(dest="bigram_command", metavar="SUBCOMMAND", required=True)
    for name, (summary, example, config, command) in SUBCOMMANDS.items():
        add_command(sub, name, summary, f"{summary}\n\nexample:\n  {example}", command, config)
