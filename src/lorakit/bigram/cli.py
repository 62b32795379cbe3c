"""`lorakit bigram ...`: each subcommand is a plain typed function `cmd_*`, callable from Python too."""

from __future__ import annotations

import argparse
import math
import time
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


def _size(n_bytes: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, like the text sizes users quote)."""
    for unit in ("B", "KB", "MB"):
        if n_bytes < 999.95:  # so 999,999 B reads 1.0 MB, not 1000.0 KB
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} GB"


def cmd_train(text: Path, out: Path) -> Grid:
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


def cmd_adapt(base_path: Path, text: Path, out: Path) -> LoraGrid:
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


def cmd_sample(
    base_path: Path, loras: list[str], start: str | None, n: int, seed: int, smoothing: float
) -> str:
    base = load_grid(base_path)
    mix = combine(base, load_adapters(base, loras))
    text = detokenize(sample(mix, start, n, seed, smoothing))
    print(text)
    return text


def cmd_diff(base_path: Path, lora_spec: str, top: int, plot: Path | None) -> list[RowChange]:
    base = load_grid(base_path)
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


def cmd_eval(
    base_path: Path,
    held_out: Path,
    loras: list[str],
    smoothing: float,
    factors: list[float],
    curve: Path | None = None,
    fractions: list[float] | None = None,
    curve_scale: float = 1.0,
    plot: Path | None = None,
) -> tuple[list[tuple[float, Score]], list[CurvePoint]]:
    """Print the scale sweep (and the data curve); return both for Python callers."""
    if plot is not None and curve is None:
        raise UserError("--plot draws the --curve; add --curve DOMAIN.txt")
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


def cmd_show(base_path: Path, row: str, loras: list[str], top: int) -> list[RowEntry]:
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


def _exit0(result: object) -> int:
    """The CLI has printed what matters; the return value of a cmd_* is for Python callers."""
    return 0


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers separated by commas, got {text!r}")
    return values


def _parser(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\nexample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


_BASE_HELP = "base grid file written by `lorakit bigram train`"


def _lora_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA grid and its scale (default 1); repeat to mix several")


def register(subparsers) -> None:
    bigram = subparsers.add_parser(
        "bigram",
        help="bigram count grids and their LoRA grids (the readable LoRA)",
        description="A language model that is a grid of word-pair counts, adapted to a domain by a "
        "grid of extra counts. See docs/bigram.md.",
    )
    sub = bigram.add_subparsers(dest="bigram_command", metavar="SUBCOMMAND", required=True)

    p = _parser(sub, "train", "count the base grid of a text",
                "lorakit bigram train general.txt -o base.bigram")
    p.add_argument("text", type=Path, help="UTF-8 text file")
    p.add_argument("-o", "--out", type=Path, required=True, help="base grid file to write")
    p.set_defaults(func=lambda a: _exit0(cmd_train(a.text, a.out)))

    p = _parser(sub, "adapt", "count a LoRA grid of domain text against a base grid",
                "lorakit bigram adapt base.bigram pirate.txt -o pirate.lora")
    p.add_argument("base", type=Path, help=_BASE_HELP)
    p.add_argument("text", type=Path, help="UTF-8 domain text file")
    p.add_argument("-o", "--out", type=Path, required=True, help="LoRA grid file to write")
    p.set_defaults(func=lambda a: _exit0(cmd_adapt(a.base, a.text, a.out)))

    p = _parser(sub, "sample", "generate text from base + Σ scale × LoRA",
                'lorakit bigram sample base.bigram --lora pirate.lora:2.0 --start "i" -n 30 --seed 7')
    p.add_argument("base", type=Path, help=_BASE_HELP)
    _lora_option(p)
    p.add_argument("--start", default=None, help="first word(s); default: a sentence start")
    p.add_argument("-n", type=int, default=30, help="words to draw (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--smoothing", type=float, default=0.0,
                   help="add this to every cell of a row before drawing (default 0)")
    p.set_defaults(func=lambda a: _exit0(cmd_sample(a.base, a.lora, a.start, a.n, a.seed, a.smoothing)))

    p = _parser(sub, "diff", "the words whose next-word distribution a LoRA grid moves most",
                "lorakit bigram diff base.bigram pirate.lora --top 20 --plot rows.png")
    p.add_argument("base", type=Path, help=_BASE_HELP)
    p.add_argument("lora", metavar="LORA[:SCALE]", help="LoRA grid file, scale 1 unless given")
    p.add_argument("--top", type=int, default=20, help="rows to list (default 20)")
    p.add_argument("--plot", type=Path, default=None, help="heatmap PNG of the top rows")
    p.set_defaults(func=lambda a: _exit0(cmd_diff(a.base, a.lora, a.top, a.plot)))

    p = _parser(sub, "eval", "held-out log-likelihood and perplexity, scale sweep, data curve",
                "lorakit bigram eval base.bigram --lora pirate.lora:1.0 held_out.txt "
                "--curve pirate.txt --plot curve.png")
    p.add_argument("base", type=Path, help=_BASE_HELP)
    p.add_argument("held_out", type=Path, help="UTF-8 text to score")
    _lora_option(p)
    p.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                   help=f"add-k smoothing, must be > 0 (default {DEFAULT_SMOOTHING})")
    p.add_argument("--factors", type=_floats, default=list(DEFAULT_FACTORS),
                   help="multiply all LoRA scales by each of these (default 0,0.5,1,2)")
    p.add_argument("--curve", type=Path, default=None, metavar="DOMAIN.txt",
                   help="also score base, from-scratch and base+LoRA on growing prefixes of this text")
    p.add_argument("--fractions", type=_floats, default=list(DEFAULT_FRACTIONS),
                   help="prefix sizes for --curve (default 0.01,0.03,0.1,0.3,1)")
    p.add_argument("--curve-scale", type=float, default=1.0, help="LoRA scale on the curve (default 1)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the --curve")
    p.set_defaults(func=lambda a: _exit0(cmd_eval(a.base, a.held_out, a.lora, a.smoothing, a.factors,
                                           a.curve, a.fractions, a.curve_scale, a.plot)))

    p = _parser(sub, "show", "one row of the grid as counts, before and after LoRA grids",
                "lorakit bigram show base.bigram --row saw --lora pirate.lora")
    p.add_argument("base", type=Path, help=_BASE_HELP)
    p.add_argument("--row", required=True, help="the current word")
    _lora_option(p)
    p.add_argument("--top", type=int, default=20, help="next words to list (default 20)")
    p.set_defaults(func=lambda a: _exit0(cmd_show(a.base, a.row, a.lora, a.top)))
