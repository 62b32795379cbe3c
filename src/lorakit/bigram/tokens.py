"""Text -> tokens for the bigram grids: one set of rules, used by train, adapt, sample and eval.

Rules (also in docs/bigram.md; bump TOKENIZER_VERSION when any of them changes, because grid files
record it and refuse to mix):
1. Unicode NFKC, then lower-case; typographic apostrophes become `'`.
2. A word is a run of letters/digits, with inner `'` or `-` kept (`don't`, `well-known`); a decimal
   number keeps its point (`3.14`).
3. Every other non-space character is a token of its own (`,` `.` `"` `(` ...).
4. `<s>` marks a sentence boundary: at the start and end of the text, after `.` `!` `?` (after the
   last one of a run such as `?!`) and at a blank line. Boundaries never repeat.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np

from lorakit.errors import UserError

TOKENIZER_VERSION = 1
BOUNDARY = "<s>"

# NUL cannot occur in text we accept (read_text rejects it as binary), so it is a safe in-band
# marker for blank lines while the regex engine does all the per-character work in C.
_MARK = "\x00"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_TOKEN = re.compile(
    _MARK  # boundary marker
    + r"|\d+(?:\.\d+)+"  # number with a decimal point: its "." does not end a sentence
    + r"|[^\W_]+(?:['-][^\W_]+)*"  # word, inner apostrophes and hyphens kept
    + r"|[^\w\s]|_"  # any other visible character on its own
)
_SENTENCE_END = (".", "!", "?")
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}'%")


def encode(text: str) -> tuple[list[str], np.ndarray]:
    """Tokenize `text` into (distinct tokens in order of first use, (N,) int64 ids into that list).

    The hot path of training: one regex pass and one dict lookup per token, no per-pair Python.
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'").replace("\u2018", "'")
    text = _MARK + " " + _BLANK_LINE.sub(" " + _MARK + " ", text) + " " + _MARK
    tokens = _TOKEN.findall(text)
    index = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}  # first-use order; _MARK is 0
    ids = np.fromiter(map(index.__getitem__, tokens), dtype=np.int64, count=len(tokens))  # (N,)
    # A boundary after the last of a run of . ! ? tokens, then no two boundaries in a row.
    is_end = np.isin(ids, [index[t] for t in _SENTENCE_END if t in index])  # (N,)
    run_ends = np.flatnonzero(is_end & ~np.append(is_end[1:], False))
    ids = np.insert(ids, run_ends + 1, 0)
    is_mark = ids == 0
    ids = ids[np.append(True, ~(is_mark[1:] & is_mark[:-1]))]
    words = [BOUNDARY if tok == _MARK else tok for tok in index]
    return words, ids


def tokenize(text: str) -> list[str]:
    """The token sequence of `text`, boundaries included: "I saw." -> ['<s>', 'i', 'saw', '.', '<s>']."""
    words, ids = encode(text)
    return [words[i] for i in ids]


def detokenize(tokens: list[str]) -> str:
    """Readable text from tokens: one sentence per line, punctuation attached to the word before."""
    out: list[str] = []
    for tok in tokens:
        if tok == BOUNDARY:
            if out and out[-1] != "\n":
                out.append("\n")
        elif out and out[-1] != "\n" and tok not in _NO_SPACE_BEFORE:
            out.append(" " + tok)
        else:
            out.append(tok)
    return "".join(out).strip("\n")


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file for training or eval; refuse missing, binary and word-less files."""
    from lorakit.files import read_bytes

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path}: no such text file; check the path")
    raw = read_bytes(path, "text file")  # a directory or FIFO is refused, never read
    if b"\x00" in raw:
        raise UserError(f"{path}: looks like a binary file (NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}); convert it to UTF-8"
        ) from None
    if not any(ch.isalnum() for ch in text):
        raise UserError(f"{path}: contains no words; give a text with at least one sentence")
    return text
