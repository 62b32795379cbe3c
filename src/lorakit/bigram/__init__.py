"""The bigram LoRA: a word-pair count grid, adapted to a domain by a grid of extra counts.

    base = train_grid(general_text)                   # grid[w, v] = how often v follows w
    lora = adapt_grid(base, pirate_text)              # same columns, only rows seen in pirate_text
    mix = combine(base, [(lora, 2.0)])                # counts = base + 2 × lora
    words = sample(mix, start="i", n=30, seed=7)

Modules: tokens (text -> tokens), model (grids, mixing, sampling), io (files), evaluate
(perplexity, scale sweep, data curve), report (diff, show), plots (PNGs), cli (`lorakit bigram`).
"""

from lorakit.bigram.evaluate import CurvePoint, Score, data_curve, scale_sweep, score
from lorakit.bigram.io import FORMAT_VERSION, load_grid, load_lora, save_grid, save_lora
from lorakit.bigram.model import (
    Grid,
    LoraGrid,
    Mixture,
    adapt_grid,
    check_lora,
    combine,
    count_pairs,
    draw_next,
    next_word_probs,
    sample,
    train_grid,
    vocab_fingerprint,
)
from lorakit.bigram.report import RowChange, RowEntry, row_changes, row_entries
from lorakit.bigram.tokens import BOUNDARY, TOKENIZER_VERSION, detokenize, read_text, tokenize

__all__ = [
    "BOUNDARY",
    "FORMAT_VERSION",
    "TOKENIZER_VERSION",
    "CurvePoint",
    "Grid",
    "LoraGrid",
    "Mixture",
    "RowChange",
    "RowEntry",
    "Score",
    "adapt_grid",
    "check_lora",
    "combine",
    "count_pairs",
    "data_curve",
    "detokenize",
    "draw_next",
    "load_grid",
    "load_lora",
    "next_word_probs",
    "read_text",
    "row_changes",
    "row_entries",
    "sample",
    "save_grid",
    "save_lora",
    "scale_sweep",
    "score",
    "tokenize",
    "train_grid",
    "vocab_fingerprint",
]
