"""Grid files: safetensors holding three sparse arrays, with the vocabulary in the JSON header.

Layout, format version 1 (documented in docs/bigram.md):
  tensors   rows int32 (nnz,), cols int32 (nnz,), counts int64 (nnz,), sorted by (row, col)
  metadata  format="lorakit.bigram", format_version="1", tokenizer_version, kind="base"|"lora",
            base: vocab (JSON list of words, id order), vocab_fingerprint
            lora: extra_vocab (JSON list), base_fingerprint, base_vocab_size
No pickle anywhere: safetensors is plain bytes plus a JSON header any language can read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from lorakit.bigram.model import Grid, LoraGrid, vocab_fingerprint
from lorakit.bigram.tokens import BOUNDARY, TOKENIZER_VERSION
from lorakit import files
from lorakit.errors import UserError

FORMAT = "lorakit.bigram"
FORMAT_VERSION = 1
_REQUIRED = {
    "base": ("vocab", "vocab_fingerprint"),
    "lora": ("extra_vocab", "base_fingerprint", "base_vocab_size"),
}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write atomically; the output directory must exist (bigram files never create directories)."""
    files.atomic_write_bytes(path, data, make_parents=False)


def _tensors(rows: np.ndarray, cols: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "rows": np.ascontiguousarray(rows, dtype=np.int32),
        "cols": np.ascontiguousarray(cols, dtype=np.int32),
        "counts": np.ascontiguousarray(counts, dtype=np.int64),
    }


def _header(kind: str) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "tokenizer_version": str(TOKENIZER_VERSION),
        "kind": kind,
    }


def save_grid(grid: Grid, path: str | Path) -> None:
    meta = _header("base") | {
        "vocab": json.dumps(list(grid.vocab), ensure_ascii=False),
        "vocab_fingerprint": vocab_fingerprint(grid.vocab),
    }
    atomic_write_bytes(path, save(_tensors(grid.rows, grid.cols, grid.counts), metadata=meta))


def save_lora(lora: LoraGrid, path: str | Path) -> None:
    meta = _header("lora") | {
        "extra_vocab": json.dumps(list(lora.extra_vocab), ensure_ascii=False),
        "base_fingerprint": lora.base_fingerprint,
        "base_vocab_size": str(lora.base_size),
    }
    atomic_write_bytes(path, save(_tensors(lora.rows, lora.cols, lora.counts), metadata=meta))


def _read(path: str | Path, want: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path}: no such grid file; check the path")
    with files.open_regular(path, "grid file"):  # a directory, FIFO or link loop: one line, never a hang
        pass
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {key: f.get_tensor(key) for key in ("rows", "cols", "counts") if key in f.keys()}
    except Exception:  # safetensors raises several types for a bad header; all mean the same here
        raise UserError(f"{path}: not a bigram grid file (unreadable safetensors header)") from None
    if meta.get("format") != FORMAT or len(arrays) != 3:
        raise UserError(f"{path}: not a bigram grid file (format is {meta.get('format')!r})")
    version = meta.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise UserError(
            f"{path}: grid format version {version}, this lorakit reads version {FORMAT_VERSION}; "
            "retrain it or upgrade lorakit"
        )
    if meta.get("tokenizer_version") != str(TOKENIZER_VERSION):
        raise UserError(
            f"{path}: made with tokenizer version {meta.get('tokenizer_version')}, this lorakit "
            f"uses {TOKENIZER_VERSION}; retrain it"
        )
    kind = meta.get("kind")
    if kind != want:
        hint = "pass the base grid first" if kind == "lora" else "pass it as the base grid"
        raise UserError(f"{path}: is a {kind} grid where a {want} grid was expected; {hint}")
    missing = [key for key in _REQUIRED[kind] if key not in meta]
    if missing:
        raise UserError(f"{path}: damaged grid file (header lacks {', '.join(missing)})")
    return meta, arrays


def _checked_arrays(
    path: str | Path, arrays: dict[str, np.ndarray], size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols, counts = (arrays[k].astype(np.int64) for k in ("rows", "cols", "counts"))
    ok = rows.ndim == cols.ndim == counts.ndim == 1 and len(rows) == len(cols) == len(counts)
    if ok and len(rows):
        ok = rows.min() >= 0 and cols.min() >= 0 and max(rows.max(), cols.max()) < size
        ok = ok and counts.min() > 0
    if not ok:
        raise UserError(f"{path}: damaged grid file (indices or counts out of range); rewrite it")
    return rows, cols, counts


def _json_list(path: str | Path, meta: dict[str, str], key: str) -> tuple[str, ...]:
    try:
        words = json.loads(meta[key])
    except (ValueError, RecursionError):  # broken JSON, 5000-digit numbers, deep nesting
        words = None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise UserError(f"{path}: damaged grid file ({key} is not a JSON list of words)")
    return tuple(words)


def load_grid(path: str | Path) -> Grid:
    meta, arrays = _read(path, "base")
    vocab = _json_list(path, meta, "vocab")
    if vocab_fingerprint(vocab) != meta.get("vocab_fingerprint"):
        raise UserError(f"{path}: damaged grid file (vocabulary does not match its fingerprint)")
    if not vocab or vocab[0] != BOUNDARY or len(set(vocab)) != len(vocab):
        raise UserError(f"{path}: damaged grid file (the vocabulary must start with {BOUNDARY} and name each "
                        "word once)")
    return Grid(vocab, *_checked_arrays(path, arrays, len(vocab)))


def load_lora(path: str | Path) -> LoraGrid:
    meta, arrays = _read(path, "lora")
    extra = _json_list(path, meta, "extra_vocab")
    if BOUNDARY in extra or len(set(extra)) != len(extra):
        raise UserError(f"{path}: damaged grid file (extra_vocab repeats a word)")
    if not re.fullmatch(r"[0-9]{1,9}", meta["base_vocab_size"]):  # ASCII digits only: '²'.isdigit() is True
        raise UserError(f"{path}: damaged grid file (base_vocab_size is not a number)")
    base_size = int(meta["base_vocab_size"])
    rows, cols, counts = _checked_arrays(path, arrays, base_size + len(extra))
    return LoraGrid(meta["base_fingerprint"], base_size, extra, rows, cols, counts)
