"""The bigram LoRA as a library: the lesson's worked example as an oracle, plus the edges.

Expected counts below are counted by hand from the texts, not by the code under test.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter

import numpy as np
import pytest

from lorakit.bigram import (
    BOUNDARY,
    adapt_grid,
    combine,
    data_curve,
    draw_next,
    load_grid,
    load_lora,
    next_word_probs,
    read_text,
    row_changes,
    row_entries,
    sample,
    save_grid,
    save_lora,
    scale_sweep,
    score,
    tokenize,
    train_grid,
)
from lorakit.bigram.tokens import encode
from lorakit.errors import UserError

GENERAL = (
    "The cat sat on the mat. I saw the dog. I saw the mat. "
    "The dog saw a bird. A bird sat on a tree. I like the cat."
)
DOMAIN = "I saw a red cat. I saw the red dog."
S = BOUNDARY

# Hand count of DOMAIN: <s> i saw a red cat . <s> i saw the red dog . <s>
DOMAIN_PAIRS = {
    (S, "i"): 2, ("i", "saw"): 2, ("saw", "a"): 1, ("saw", "the"): 1, ("a", "red"): 1,
    ("red", "cat"): 1, ("cat", "."): 1, (".", S): 2, ("the", "red"): 1, ("red", "dog"): 1,
    ("dog", "."): 1,
}  # fmt: skip
# Hand count of two rows of GENERAL.
BASE_SAW = {"the": 2, "a": 1}
BASE_THE = {"cat": 2, "mat": 2, "dog": 2}


@pytest.fixture(scope="module")
def base():
    return train_grid(GENERAL)


@pytest.fixture(scope="module")
def lora(base):
    return adapt_grid(base, DOMAIN)


def lora_pairs(base, lora) -> dict[tuple[str, str], int]:
    vocab = base.vocab + lora.extra_vocab
    return {
        (vocab[r], vocab[c]): int(n) for r, c, n in zip(lora.rows, lora.cols, lora.counts, strict=True)
    }


def row_dict(mix, word) -> dict[str, float]:
    cols, values = mix.row(mix.index()[word])
    return {mix.vocab[c]: float(v) for c, v in zip(cols, values, strict=True)}


# --- tokenization -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, tokens",
    [
        ("I saw.", [S, "i", "saw", ".", S]),
        ("Hello, World!", [S, "hello", ",", "world", "!", S]),
        ("Pi is 3.14 today.", [S, "pi", "is", "3.14", "today", ".", S]),
        ("Really?! Yes", [S, "really", "?", "!", S, "yes", S]),
        ("Don\u2019t stop", [S, "don't", "stop", S]),
        ("well-known (x)", [S, "well-known", "(", "x", ")", S]),
        ("one\n\n\ntwo", [S, "one", S, "two", S]),
        ("end.\n\nnext", [S, "end", ".", S, "next", S]),  # boundaries never repeat
        ("ÉTÉ Straße", [S, "été", "straße", S]),
        ("", [S]),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


# --- the worked example -------------------------------------------------------------------------

def test_base_rows_are_the_hand_counts(base):
    mix = combine(base)
    assert row_dict(mix, "saw") == BASE_SAW
    assert row_dict(mix, "the") == BASE_THE


def test_lora_has_exactly_the_rows_followed_by_something_in_the_domain_text(base, lora):
    assert lora_pairs(base, lora) == DOMAIN_PAIRS
    rows = {(base.vocab + lora.extra_vocab)[r] for r in lora.row_ids()}
    assert rows == {a for a, _ in DOMAIN_PAIRS}
    assert lora.extra_vocab == ("red",)  # the one word the base never saw


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.0, 3.0])
def test_mixed_saw_row_is_base_plus_scale_times_lora(base, lora, scale):
    mix = combine(base, [(lora, scale)])
    expected = {w: BASE_SAW.get(w, 0) + scale * DOMAIN_PAIRS.get(("saw", w), 0) for w in ("the", "a")}
    assert row_dict(mix, "saw") == expected


def test_scale_zero_is_the_base(base, lora):
    plain, zero = combine(base), combine(base, [(lora, 0.0)])
    for word in base.vocab:
        assert row_dict(zero, word) == row_dict(plain, word)
    assert zero.vocab[: len(base.vocab)] == base.vocab
    assert sample(zero, n=60, seed=3) == sample(plain, n=60, seed=3)


def test_rows_the_lora_lacks_sample_exactly_as_the_base(base, lora):
    plain, mixed = combine(base), combine(base, [(lora, 2.0)])
    lora_rows = {a for a, _ in DOMAIN_PAIRS}
    untouched = [w for w in base.vocab if w not in lora_rows]
    assert set(untouched) == {"sat", "on", "mat", "bird", "like", "tree"}
    for word in untouched:
        p_mixed = next_word_probs(mixed, word)
        np.testing.assert_array_equal(p_mixed[: len(base.vocab)], next_word_probs(plain, word))
        assert p_mixed[len(base.vocab) :].sum() == 0
        for seed in range(25):
            draws = [draw_next(m, m.index()[word], np.random.default_rng(seed)) for m in (plain, mixed)]
            assert plain.vocab[draws[0]] == mixed.vocab[draws[1]]


def test_several_loras_add_up_and_share_new_words(base, lora):
    legal = adapt_grid(base, "I saw the red court. The court saw the law.")
    mix = combine(base, [(lora, 2.0), (legal, 0.5)])
    assert mix.vocab[len(base.vocab) :] == ("red", "court", "law")  # "red" once, first LoRA first
    # saw: base the 2, a 1; pirate the 1, a 1; legal the 2 -> the 2 + 2 + 1, a 1 + 2
    assert row_dict(mix, "saw") == {"the": 5.0, "a": 3.0}
    assert row_dict(mix, "red") == {"cat": 2.0, "dog": 2.0, "court": 0.5}


@pytest.mark.parametrize("smoothing", [0.0, 1.0])
def test_draws_follow_the_mixed_distribution(base, lora, smoothing):
    mix = combine(base, [(lora, 2.0)])
    rng = np.random.default_rng(0)
    saw = mix.index()["saw"]
    draws = Counter(mix.vocab[draw_next(mix, saw, rng, smoothing)] for _ in range(6000))
    size = len(mix.vocab)
    for word, count in (("the", 4.0), ("a", 3.0), ("cat", 0.0)):  # saw: the 2+2×1, a 1+2×1
        expected = (count + smoothing) / (7.0 + smoothing * size)
        assert abs(draws[word] / 6000 - expected) < 0.025, (word, draws[word])


def test_new_word_row_is_a_dead_end_without_the_lora(base, lora):
    mix = combine(base, [(lora, 0.0)])  # "red" is in the vocabulary, but no counts follow it
    assert sample(mix, start="red", n=1, seed=0) == ["red", S]
    assert sample(combine(base, [(lora, 1.0)]), start="red", n=1, seed=0)[1] in {"cat", "dog"}


def test_seeded_sampling_is_reproducible_and_seeds_differ(base, lora):
    mix = combine(base, [(lora, 1.0)])
    assert sample(mix, start="i", n=40, seed=7) == sample(mix, start="i", n=40, seed=7)
    assert len({tuple(sample(mix, n=40, seed=s)) for s in range(5)}) > 1
    assert sample(mix, start="The cat", n=0) == ["the", "cat"]


# --- files --------------------------------------------------------------------------------------

def header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])["__metadata__"]


def test_files_round_trip_with_a_versioned_header(base, lora, tmp_path):
    save_grid(base, tmp_path / "base.bigram")
    save_lora(lora, tmp_path / "x.lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.bigram", "x.lora"]  # no temp left
    base2, lora2 = load_grid(tmp_path / "base.bigram"), load_lora(tmp_path / "x.lora")
    assert base2.vocab == base.vocab and lora_pairs(base2, lora2) == DOMAIN_PAIRS
    np.testing.assert_array_equal(base2.counts, base.counts)
    meta = header(tmp_path / "x.lora")
    assert (meta["format"], meta["format_version"], meta["kind"]) == ("lorakit.bigram", "1", "lora")
    assert json.loads(meta["extra_vocab"]) == ["red"]


def edit_header(path, **changes) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    head["__metadata__"].update(changes)
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": "2"}, "format version 2"),
        ({"tokenizer_version": "0"}, "tokenizer version"),
        ({"format": "other"}, "not a bigram grid"),
        ({"kind": "lora"}, "pass the base grid first"),
        ({"vocab": json.dumps(["<s>", "x"])}, "damaged"),
        ({"vocab": "[not json"}, "damaged"),
    ],
)
def test_bad_grid_files_are_refused(base, tmp_path, change, message):
    path = tmp_path / "base.bigram"
    save_grid(base, path)
    edit_header(path, **change)
    with pytest.raises(UserError, match=message):
        load_grid(path)


def test_garbage_and_missing_grid_files_are_refused(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x89PNG not a grid at all")
    with pytest.raises(UserError, match="not a bigram grid"):
        load_grid(tmp_path / "junk")
    with pytest.raises(UserError, match="no such grid file"):
        load_lora(tmp_path / "missing.lora")


def test_a_lora_for_another_base_is_refused(lora):
    other = train_grid("Completely different words live here.")
    with pytest.raises(UserError, match="another base grid"):
        combine(other, [(lora, 1.0)])


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no words"),
        (b"  ... !!\n\n", "no words"),
        (b"text\x00\x01\x02binary", "binary"),
        (b"caf\xe9 latin-1", "not UTF-8"),
    ],
)
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "in.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_text(path)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda base, lora: train_grid(""), "no words"),
        (lambda base, lora: adapt_grid(base, " ;; "), "no words"),
        (lambda base, lora: sample(combine(base), start="zebra"), "'zebra' is not in the vocabulary"),
        (lambda base, lora: sample(combine(base), start="cat", n=-1), "-n must be >= 0"),
        (lambda base, lora: combine(base, [(lora, -1.0)]), "scale must be"),
        (lambda base, lora: combine(base, [(lora, math.nan)]), "scale must be"),
        (lambda base, lora: scale_sweep(base, [], "the cat.", smoothing=0.0), "smoothing > 0"),
        (lambda base, lora: row_entries(base, "zebra"), "'zebra' is not in the vocabulary"),
        (lambda base, lora: read_text("/nonexistent/general.txt"), "no such text file"),
    ],
)
def test_user_errors(base, lora, call, message):
    with pytest.raises(UserError, match=message):
        call(base, lora)


# --- eval, diff, show ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "held_out, probs, skipped",
    [
        # base "a b. a b.": <s>->a 2, a->b 2, b->. 2, .-><s> 2; V = 4, k = 0.5: seen (2.5)/(4), unseen 0.5/4
        ("a b.", [0.625, 0.625, 0.625, 0.625], 0),
        ("b a.", [0.125, 0.125, 0.125, 0.625], 0),
        ("a zebra b.", [0.625, 0.625, 0.625], 2),  # pairs touching "zebra" are skipped
    ],
)
def test_score_matches_add_k_by_hand(held_out, probs, skipped):
    grid = train_grid("a b. a b.")
    words, ids = encode(held_out)
    s = score(combine(grid), words, ids, grid.vocab, smoothing=0.5)
    assert (s.pairs, s.skipped) == (len(probs), skipped)
    assert s.log_likelihood == pytest.approx(sum(math.log(p) for p in probs))
    assert s.perplexity == pytest.approx(math.exp(-sum(math.log(p) for p in probs) / len(probs)))


def test_lora_lowers_held_out_perplexity_and_the_curve_ends_at_the_full_text(base, lora):
    held = "I saw the red dog. I saw a red cat."
    sweep = dict(scale_sweep(base, [(lora, 1.0)], held))
    assert sweep[0.0].perplexity > sweep[0.5].perplexity > sweep[1.0].perplexity
    points = data_curve(base, DOMAIN, held, fractions=(0.2, 1.0))
    assert [p.domain_tokens for p in points] == [3, 15]
    assert points[-1].lora.perplexity < points[-1].base.perplexity
    assert points[0].base == points[-1].base


def js_bits(p: dict[str, float], q: dict[str, float]) -> float:
    m = {w: (p.get(w, 0) + q.get(w, 0)) / 2 for w in p.keys() | q.keys()}
    kl = lambda a: sum(v * math.log2(v / m[w]) for w, v in a.items() if v > 0)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def test_diff_ranks_by_weighted_divergence(base, lora):
    changes = {c.word: c for c in row_changes(base, lora, scale=1.0, top=50)}
    assert set(changes) == {a for a, _ in DOMAIN_PAIRS}
    first = row_changes(base, lora, top=1)[0]
    assert (first.word, first.new_word, first.divergence) == ("red", True, 1.0)
    saw = changes["saw"]
    assert saw.weight == pytest.approx(2 / 14)
    assert saw.divergence == pytest.approx(js_bits({"the": 2 / 3, "a": 1 / 3}, {"the": 3 / 5, "a": 2 / 5}))
    assert changes["the"].gained == [("red", pytest.approx(1 / 7))]
    assert {w for w, _ in changes["the"].lost} == {"cat", "mat", "dog"}


def test_show_row_before_and_after(base, lora):
    entries = {e.next_word: e for e in row_entries(base, "saw", [(lora, 2.0)])}
    assert {w: (e.base, e.lora) for w, e in entries.items()} == {"the": (2, 2), "a": (1, 2)}
    assert entries["the"].p_before == pytest.approx(2 / 3)
    assert entries["the"].p_after == pytest.approx(4 / 7)
