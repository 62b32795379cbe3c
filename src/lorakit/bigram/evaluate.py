"""Held-out log-likelihood and perplexity of mixed grids; the scale sweep and the data curve.

P(v | w) = (counts(w, v) + k) / (row total(w) + k × V), V the size of the evaluation vocabulary.
k > 0 is required here: one held-out pair the grid never saw would make the perplexity infinite.
Pairs with a word outside the evaluation vocabulary are skipped (and counted), the same pairs for
every model compared, so their numbers stay comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorakit.bigram.model import (
    Grid,
    LoraGrid,
    Mixture,
    combine,
    grid_from_tokens,
    lora_from_tokens,
    require_words,
)
from lorakit.bigram.tokens import encode
from lorakit.errors import UserError

DEFAULT_SMOOTHING = 0.1
DEFAULT_FACTORS = (0.0, 0.5, 1.0, 2.0)
DEFAULT_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass(frozen=True)
class Score:
    pairs: int  # held-out word pairs scored
    skipped: int  # pairs left out: a word outside the evaluation vocabulary
    log_likelihood: float  # natural log, summed over the scored pairs

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_likelihood / self.pairs) if self.pairs else math.nan


@dataclass(frozen=True)
class CurvePoint:
    domain_tokens: int  # tokens of domain text the two domain models were counted on
    base: Score  # base grid alone (does not change along the curve)
    scratch: Score  # grid counted from scratch on those domain tokens only
    lora: Score  # base + scale × LoRA grid counted on the same tokens


def check_smoothing(smoothing: float) -> float:
    if not (math.isfinite(smoothing) and smoothing > 0):
        raise UserError(
            f"eval needs --smoothing > 0 (got {smoothing}): a held-out pair the grid never saw "
            "would otherwise make the perplexity infinite"
        )
    return float(smoothing)


def score(
    mix: Mixture,
    words: list[str],
    ids: np.ndarray,
    eval_vocab: Sequence[str],
    smoothing: float = DEFAULT_SMOOTHING,
) -> Score:
    """Log-likelihood of the encoded held-out text under `mix`, over `eval_vocab` (⊇ mix.vocab)."""
    smoothing = check_smoothing(smoothing)
    in_eval_set = set(eval_vocab)
    mix_index = mix.index()
    in_eval = np.array([w in in_eval_set for w in words], dtype=bool)
    mix_id = np.array([mix_index.get(w, -1) for w in words], dtype=np.int64)
    prev, nxt = ids[:-1], ids[1:]  # (N-1,) each
    scored = in_eval[prev] & in_eval[nxt]
    a, b = mix_id[prev[scored]], mix_id[nxt[scored]]  # (P,) -1 where the mix lacks the word

    size = len(mix.vocab)
    rows = np.repeat(np.arange(size), np.diff(mix.indptr))  # (nnz,)
    codes = rows * size + mix.cols  # ascending: CSR is sorted by row, then column
    row_total = np.bincount(rows, weights=mix.values, minlength=size)  # (V,)
    known = (a >= 0) & (b >= 0)
    query = np.where(known, a * size + b, -1)
    at = np.minimum(np.searchsorted(codes, query), len(codes) - 1)  # a mix is never empty
    pair_count = np.where(known & (codes[at] == query), mix.values[at], 0.0)
    totals = np.where(a >= 0, row_total[np.maximum(a, 0)], 0.0)
    probs = (pair_count + smoothing) / (totals + smoothing * len(eval_vocab))
    return Score(int(scored.sum()), int((~scored).sum()), float(np.log(probs).sum()))


def scale_sweep(
    base: Grid,
    adapters: Sequence[tuple[LoraGrid, float]],
    held_out: str,
    factors: Sequence[float] = DEFAULT_FACTORS,
    smoothing: float = DEFAULT_SMOOTHING,
) -> list[tuple[float, Score]]:
    """Score base + factor × (Σ scale × LoRA) for each factor: 0 is the base, 1 the mix as given."""
    words, ids = encode(held_out)
    require_words(words, "the held-out text")
    vocab = combine(base, [(lora, 0.0) for lora, _ in adapters]).vocab  # same for every factor
    results = []
    for factor in factors:
        mix = combine(base, [(lora, factor * scale) for lora, scale in adapters])
        results.append((factor, score(mix, words, ids, vocab, smoothing)))
    return results


def data_curve(
    base: Grid,
    domain: str,
    held_out: str,
    scale: float = 1.0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    smoothing: float = DEFAULT_SMOOTHING,
) -> list[CurvePoint]:
    """Held-out scores of base, from-scratch and base + LoRA as the domain text grows (a prefix).

    Everything is scored over one vocabulary (base words + all new words of the whole domain text),
    so the three lines can be compared point by point.
    """
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"curve fractions must lie in (0, 1], got {list(fractions)}")
    dom_words, dom_ids = encode(domain)
    held_words, held_ids = encode(held_out)
    require_words(dom_words, "the domain text")
    require_words(held_words, "the held-out text")
    full = lora_from_tokens(base, dom_words, dom_ids)
    vocab = combine(base, [(full, 0.0)]).vocab
    base_score = score(combine(base), held_words, held_ids, vocab, smoothing)
    points = []
    for m in sorted({max(2, round(f * len(dom_ids))) for f in fractions}):
        prefix = dom_ids[:m]
        scratch = combine(grid_from_tokens(dom_words, prefix))
        lora = combine(base, [(lora_from_tokens(base, dom_words, prefix), scale)])
        points.append(
            CurvePoint(
                m,
                base_score,
                score(scratch, held_words, held_ids, vocab, smoothing),
                score(lora, held_words, held_ids, vocab, smoothing),
            )
        )
    return points
