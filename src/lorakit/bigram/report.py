"""What a LoRA grid changes: per-row divergence (`diff`) and one row before/after (`show`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorakit.bigram.model import Grid, LoraGrid, Mixture, combine
from lorakit.errors import UserError


@dataclass(frozen=True)
class RowChange:
    word: str
    weight: float  # share of the domain text's word pairs that start with this word
    divergence: float  # Jensen-Shannon divergence, bits, base vs mixed next-word distribution
    score: float  # weight × divergence: the ranking key
    new_word: bool  # the base has no counts for this row
    gained: list[tuple[str, float]]  # next words whose probability rose most: (word, +Δp)
    lost: list[tuple[str, float]]  # next words whose probability fell most: (word, −Δp)


def _codes(mix: Mixture) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(len(mix.vocab)), np.diff(mix.indptr))  # (nnz,)
    return rows, rows * len(mix.vocab) + mix.cols


def _row_probs(mix: Mixture, rows: np.ndarray) -> np.ndarray:
    totals = np.bincount(rows, weights=mix.values, minlength=len(mix.vocab))
    return mix.values / totals[rows]


def row_changes(
    base: Grid, lora: LoraGrid, scale: float = 1.0, top: int = 20, examples: int = 3
) -> list[RowChange]:
    """The `top` rows whose next-word distribution moves most, weighted by domain frequency.

    A row the base never saw counts as the largest possible move, 1 bit.
    """
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    after = combine(base, [(lora, scale)])
    before = combine(base, [(lora, 0.0)])  # the base, in the same (extended) vocabulary
    rows, codes = _codes(after)
    b_rows, b_codes = _codes(before)
    # With scales >= 0 every base cell is also a cell of the mix: align base probs to mix cells.
    p = np.zeros(len(codes))
    p[np.searchsorted(codes, b_codes)] = _row_probs(before, b_rows)
    q = _row_probs(after, rows)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = 0.5 * (np.where(p > 0, p * np.log2(p / m), 0) + np.where(q > 0, q * np.log2(q / m), 0))
    size = len(after.vocab)
    js = np.bincount(rows, weights=terms, minlength=size)  # (V,)
    base_empty = np.diff(before.indptr) == 0
    js[base_empty & (np.diff(after.indptr) > 0)] = 1.0

    lora_totals = np.bincount(lora.rows, weights=lora.counts, minlength=size)
    weight = lora_totals / lora_totals.sum()
    candidates = lora.row_ids()  # one LoRA: its ids are the mix's ids
    ranked = sorted(candidates, key=lambda r: (-weight[r] * js[r], after.vocab[r]))[:top]

    changes = []
    for r in ranked:
        lo, hi = after.indptr[r], after.indptr[r + 1]
        delta = q[lo:hi] - p[lo:hi]
        order = np.argsort(-delta, kind="stable")
        gained = [(after.vocab[after.cols[lo + i]], float(delta[i])) for i in order if delta[i] > 0]
        lost = [(after.vocab[after.cols[lo + i]], float(delta[i])) for i in order[::-1] if delta[i] < 0]
        changes.append(
            RowChange(
                word=after.vocab[r],
                weight=float(weight[r]),
                divergence=float(js[r]),
                score=float(weight[r] * js[r]),
                new_word=bool(base_empty[r]),
                gained=gained[:examples],
                lost=lost[:examples],
            )
        )
    return changes


@dataclass(frozen=True)
class RowEntry:
    next_word: str
    base: float  # base count
    lora: float  # Σ scale × LoRA count
    p_before: float  # base probability
    p_after: float  # probability after mixing


def row_entries(
    base: Grid, word: str, adapters: Sequence[tuple[LoraGrid, float]] = (), top: int = 20
) -> list[RowEntry]:
    """One row, before and after the LoRA grids, largest mixed counts first."""
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    before = combine(base, [(lora, 0.0) for lora, _ in adapters])
    after = combine(base, adapters)
    word_id = after.index().get(word)
    if word_id is None:
        raise UserError(
            f"'{word}' is not in the vocabulary ({len(after.vocab)} words); pick a word of the "
            "training text (the vocabulary is lower-cased)"
        )
    b, a = before.dense_row(word_id), after.dense_row(word_id)  # (V,) each
    p_b = b / b.sum() if b.sum() else b
    p_a = a / a.sum() if a.sum() else a
    order = [i for i in np.argsort(-a, kind="stable")[:top] if a[i] > 0]
    return [
        RowEntry(after.vocab[i], float(b[i]), float(a[i] - b[i]), float(p_b[i]), float(p_a[i]))
        for i in order
    ]


def probability_table(
    base: Grid, lora: LoraGrid, scale: float, words: Sequence[str], max_cols: int = 16
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Next-word columns and (R, C) probabilities before/after for `words`: the heatmap's data."""
    before = combine(base, [(lora, 0.0)])
    after = combine(base, [(lora, scale)])
    index = after.index()
    ids = [index[w] for w in words]

    def probs(mix: Mixture) -> np.ndarray:
        dense = np.stack([mix.dense_row(i) for i in ids])  # (R, V)
        totals = dense.sum(axis=1, keepdims=True)
        return np.divide(dense, totals, out=np.zeros_like(dense), where=totals > 0)

    p_before, p_after = probs(before), probs(after)  # (R, V) each
    strongest = np.maximum(p_before, p_after).max(axis=0)  # (V,)
    cols = [int(c) for c in np.argsort(-strongest, kind="stable")[:max_cols] if strongest[c] > 0]
    return [after.vocab[c] for c in cols], p_before[:, cols], p_after[:, cols]
