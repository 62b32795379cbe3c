"""Bigram count grids, their LoRA grids, the mix of both, and sampling from the mix.

A grid row is the current word, a column the next word, a cell how often that pair occurred. A
LoRA grid is counted the same way on domain text, keeps the base's columns and only the rows of
words that are followed by something in that text. Words the base never saw extend the vocabulary
(appended after the base's words; the base counts zero for them). Sampling reads

    counts(w) = base[w] + Σ_i scale_i × lora_i[w]        (lora_i[w] = 0 where lora_i has no row w)

All grids are sparse: three parallel arrays (rows, cols, counts), sorted by (row, col).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorakit.bigram.tokens import BOUNDARY, encode, tokenize
from lorakit.errors import UserError


@dataclass(frozen=True)
class Grid:
    """A base grid: word-pair counts over its own vocabulary (row and column labels alike)."""

    vocab: tuple[str, ...]  # word of each id; BOUNDARY is id 0, the rest sorted
    rows: np.ndarray  # (nnz,) int64 current-word ids
    cols: np.ndarray  # (nnz,) int64 next-word ids
    counts: np.ndarray  # (nnz,) int64, all > 0


@dataclass(frozen=True)
class LoraGrid:
    """Extra counts for a domain, tied to one base by the fingerprint of the base's vocabulary."""

    base_fingerprint: str  # vocab_fingerprint(base.vocab); checked before every use
    base_size: int  # len(base.vocab): ids below it are base words
    extra_vocab: tuple[str, ...]  # domain words the base never saw: ids base_size, base_size+1, ...
    rows: np.ndarray  # (nnz,) int64, only words followed by something in the domain text
    cols: np.ndarray  # (nnz,) int64
    counts: np.ndarray  # (nnz,) int64, all > 0

    def row_ids(self) -> np.ndarray:
        """Ids (base numbering, extended) of the rows this grid has."""
        return np.unique(self.rows)


@dataclass(frozen=True)
class Mixture:
    """base + Σ scale × LoRA as one sparse grid of float counts, in CSR form for fast row reads."""

    vocab: tuple[str, ...]  # base vocab, then the new words of each LoRA (first LoRA first)
    indptr: np.ndarray  # (V+1,) row w is cols/values[indptr[w]:indptr[w+1]]
    cols: np.ndarray  # (nnz,) int64, ascending within a row
    values: np.ndarray  # (nnz,) float64, all > 0

    def index(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.vocab)}

    def row(self, word_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The non-zero (next-word ids, counts) of one row."""
        lo, hi = self.indptr[word_id], self.indptr[word_id + 1]
        return self.cols[lo:hi], self.values[lo:hi]

    def dense_row(self, word_id: int) -> np.ndarray:
        """One row as (V,) float counts."""
        out = np.zeros(len(self.vocab))
        cols, values = self.row(word_id)
        out[cols] = values
        return out


def vocab_fingerprint(vocab: Sequence[str]) -> str:
    """sha256 of the vocabulary in id order: a LoRA's ids only mean something for this exact list."""
    return hashlib.sha256("\n".join(vocab).encode("utf-8")).hexdigest()


def count_pairs(ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count consecutive (ids[t], ids[t+1]) pairs: sparse (rows, cols, counts) sorted by (row, col)."""
    codes = ids[:-1] * size + ids[1:]  # (N-1,) one int64 per pair; size**2 < 2**63 for any real vocab
    uniq, counts = np.unique(codes, return_counts=True)
    return uniq // size, uniq % size, counts.astype(np.int64)


def require_words(words: list[str], where: str) -> None:
    """Refuse a text without a single word (a grid of it would only say "<s> follows <s>")."""
    if not any(ch.isalnum() for w in words if w != BOUNDARY for ch in w):  # punctuation is no text
        raise UserError(f"{where} contains no words; give a text with at least one sentence")


def grid_from_tokens(words: list[str], ids: np.ndarray) -> Grid:
    """The base grid of an encoded token sequence (`encode`'s output, or a prefix of its ids)."""
    used = np.zeros(len(words), dtype=bool)
    used[ids] = True  # a prefix of a text (eval --curve) may not use every word of the text
    kept = [w for w, u in zip(words, used) if u]
    # Sorted vocab with the boundary first, so a file's vocabulary does not depend on text order.
    vocab = [BOUNDARY] + sorted(w for w in kept if w != BOUNDARY)
    where = {w: i for i, w in enumerate(vocab)}
    remap = np.array([where.get(w, -1) for w in words], dtype=np.int64)
    ids = remap[ids]
    rows, cols, counts = count_pairs(ids, len(vocab))
    return Grid(tuple(vocab), rows, cols, counts)


def train_grid(text: str) -> Grid:
    """Count the base grid of `text`: grid[w, v] = how often v follows w."""
    words, ids = encode(text)
    require_words(words, "the text")
    return grid_from_tokens(words, ids)


def lora_from_tokens(base: Grid, words: list[str], ids: np.ndarray) -> LoraGrid:
    """The LoRA grid of an encoded token sequence against `base`."""
    base_index = {w: i for i, w in enumerate(base.vocab)}
    used = np.zeros(len(words), dtype=bool)
    used[ids] = True
    extra = sorted(w for w, u in zip(words, used) if u and w not in base_index)
    where = base_index | {w: len(base.vocab) + i for i, w in enumerate(extra)}
    remap = np.array([where.get(w, -1) for w in words], dtype=np.int64)
    size = len(base.vocab) + len(extra)
    rows, cols, counts = count_pairs(remap[ids], size)
    return LoraGrid(vocab_fingerprint(base.vocab), len(base.vocab), tuple(extra), rows, cols, counts)


def adapt_grid(base: Grid, text: str) -> LoraGrid:
    """Count the LoRA grid of domain `text` against `base`: base columns, only the rows seen here."""
    words, ids = encode(text)
    require_words(words, "the domain text")
    return lora_from_tokens(base, words, ids)


def check_lora(base: Grid, lora: LoraGrid, name: str = "the LoRA grid") -> None:
    """Refuse a LoRA grid counted against another base (its ids would point at the wrong words)."""
    if lora.base_size != len(base.vocab) or lora.base_fingerprint != vocab_fingerprint(base.vocab):
        raise UserError(
            f"{name} was made for another base grid (vocabulary of {lora.base_size} words, "
            f"fingerprint {lora.base_fingerprint[:12]}), not this one ({len(base.vocab)} words, "
            f"{vocab_fingerprint(base.vocab)[:12]}); re-run `lorakit bigram adapt` on this base"
        )


def check_scale(scale: float) -> float:
    # A negative scale could make counts negative, and those are not a distribution.
    if not math.isfinite(scale) or scale < 0:
        raise UserError(f"LoRA scale must be a finite number >= 0, got {scale}")
    return float(scale)


def combine(base: Grid, adapters: Sequence[tuple[LoraGrid, float]] = ()) -> Mixture:
    """Mix base and LoRA grids: counts = base + Σ scale × LoRA, over base + all new words."""
    vocab = list(base.vocab)
    where = {w: i for i, w in enumerate(vocab)}
    parts = [(base.rows, base.cols, base.counts.astype(np.float64))]
    for n, (lora, scale) in enumerate(adapters):
        check_lora(base, lora, f"LoRA grid #{n + 1}")
        scale = check_scale(scale)
        for w in lora.extra_vocab:  # several LoRAs may bring the same new word: one column for it
            if w not in where:
                where[w] = len(vocab)
                vocab.append(w)
        remap = np.concatenate([np.arange(lora.base_size), [where[w] for w in lora.extra_vocab]])
        remap = remap.astype(np.int64)
        parts.append((remap[lora.rows], remap[lora.cols], scale * lora.counts))
    size = len(vocab)
    codes = np.concatenate([r * size + c for r, c, _ in parts])  # (nnz_all,)
    values = np.concatenate([v for _, _, v in parts])
    uniq, inverse = np.unique(codes, return_inverse=True)
    summed = np.bincount(inverse, weights=values, minlength=len(uniq))  # duplicates add up
    keep = summed > 0  # scale 0 leaves the LoRA's cells at zero: drop them, the base stays exact
    uniq, summed = uniq[keep], summed[keep]
    rows = uniq // size
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=size))])
    return Mixture(tuple(vocab), indptr, uniq % size, summed)


def next_word_probs(mix: Mixture, word: str, smoothing: float = 0.0) -> np.ndarray:
    """(V,) P(next | word) = (counts + k) / (row total + k V); all zeros for a dead end with k = 0."""
    word_id = _word_id(mix, word)
    row = mix.dense_row(word_id) + smoothing
    total = row.sum()
    return row / total if total > 0 else row


def _word_id(mix: Mixture, word: str) -> int:
    try:
        return mix.index()[word]
    except KeyError:
        raise UserError(
            f"'{word}' is not in the vocabulary ({len(mix.vocab)} words, lower-cased); start from "
            "a word of the training text, or leave --start out"
        ) from None


def draw_next(mix: Mixture, word_id: int, rng: np.random.Generator, smoothing: float = 0.0) -> int:
    """Draw the id of the next word after `word_id` from the mixed counts, plus k per word.

    Works on the sparse row: mass `total` for the counted cells, k × V for the smoothing spread
    evenly. A row with no counts and k = 0 is a dead end: the sentence ends (BOUNDARY, id 0).
    One uniform draw per step, so a row no LoRA touches draws exactly what the base alone draws.
    """
    cols, values = mix.row(word_id)
    cumulative = np.cumsum(values)  # (nnz_row,)
    total = cumulative[-1] if len(cumulative) else 0.0
    spread = smoothing * len(mix.vocab)
    if total + spread <= 0:
        return 0
    x = rng.random() * (total + spread)
    if x < total:
        return int(cols[np.searchsorted(cumulative, x, side="right")])
    return min(int((x - total) / smoothing), len(mix.vocab) - 1)


def start_tokens(mix: Mixture, start: str | None) -> list[str]:
    """The tokens a sample begins with: `start` tokenized by the usual rules, or a sentence start."""
    if start is None or start.strip() in ("", BOUNDARY):
        return [BOUNDARY]
    tokens = [t for t in tokenize(start) if t != BOUNDARY]
    if not tokens:
        raise UserError(f"--start {start!r} has no words; give a word such as 'the'")
    index = mix.index()
    for tok in tokens:
        if tok not in index:
            _word_id(mix, tok)  # raises the error that says what to do
    return tokens


def sample(
    mix: Mixture, start: str | None = None, n: int = 30, seed: int = 0, smoothing: float = 0.0
) -> list[str]:
    """`start`'s tokens followed by `n` words drawn one after the other, reproducible for a seed."""
    if n < 0:
        raise UserError(f"-n must be >= 0, got {n}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    if smoothing < 0 or not math.isfinite(smoothing):
        raise UserError(f"smoothing must be a finite number >= 0, got {smoothing}")
    tokens = start_tokens(mix, start)
    rng = np.random.default_rng(seed)
    current = mix.index()[tokens[-1]]
    for _ in range(n):
        current = draw_next(mix, current, rng, smoothing)
        tokens.append(mix.vocab[current])
    return tokens
