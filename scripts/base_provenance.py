"""Writes src/lorakit/assets/PROVENANCE.md and the licence texts the assets must carry."""

from __future__ import annotations

import re
from pathlib import Path

import base_corpus as corpus

PYTHON_COPYRIGHT = Path("/usr/share/doc/python3.11/copyright")
DJANGO_COPYRIGHT = Path("/usr/share/doc/python-django-doc/copyright")


def _psf_licence() -> str:
    """The PSF License Agreement, as Debian's python3.11 copyright file carries it."""
    text = PYTHON_COPYRIGHT.read_text(encoding="utf-8")
    start = text.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = text.index("BEOPEN.COM LICENSE AGREEMENT")
    return text[start:end].strip() + "\n"


def _django_licence() -> str:
    """Django's BSD-3-Clause licence, with its copyright line, from Debian's copyright file."""
    text = DJANGO_COPYRIGHT.read_text(encoding="utf-8")
    body = text[text.index("\nLicense: BSD-3-Clause\n ") + len("\nLicense: BSD-3-Clause\n"):]
    lines = []
    for line in body.splitlines():
        if not line.startswith(" "):
            break
        lines.append("" if line.strip() == "." else line[1:])
    licence = "\n".join(lines).replace("<NAME>", "Django")
    return ("Copyright (c) Django Software Foundation and individual contributors.\n"
            "All rights reserved.\n\n" + licence.strip() + "\n")


def _kb(n: int) -> str:
    return f"{n / 1000:,.0f} KB"


def write_provenance(out: Path, built: dict, report: dict) -> None:
    licences = out / "LICENSES"
    licences.mkdir(parents=True, exist_ok=True)
    (licences / "PSF-2.0-python-docs.txt").write_text(_psf_licence(), encoding="utf-8")
    (licences / "BSD-3-Clause-django-docs.txt").write_text(_django_licence(), encoding="utf-8")

    v = {p: corpus.package_version(p) for p in corpus.DEBIAN_PACKAGES}
    train = built["general_train"]
    py_train = sum(len(t.encode()) for pkg, _, t in train if pkg == "python3.11-doc")
    dj_train = sum(len(t.encode()) for pkg, _, t in train if pkg == "python-django-doc")
    py_pages = sum(pkg == "python3.11-doc" for pkg, _, _ in train)
    dj_pages = sum(pkg == "python-django-doc" for pkg, _, _ in train)
    held = built["general_heldout"]
    held_size = (out / "corpora/general/heldout.txt").stat().st_size
    ds = built["domain_sizes"]
    shape, tr = report["shape"], report["train"]
    overlap = ", ".join(f"{k} {100 * x:.2f}%" for k, x in report["heldout_13gram_overlap"].items())

    text = f"""# Provenance of lorakit's bundled texts and base model

Everything under `src/lorakit/assets/` is produced by `scripts/build_base.py` from Debian
packages (Debian 12 "bookworm" archive). Rerun that script to reproduce it; `scripts/README.md`
says how, how long it took and on what machine. Sizes below are of the files as shipped
(UTF-8 bytes).

## Summary

| text | Debian package (version) | licence | used for | shipped files |
|---|---|---|---|---|
| Python 3.11 documentation | `python3.11-doc` ({v['python3.11-doc']}) | PSF License Agreement v2 (code examples also 0BSD) | pretraining the base; general held-out | `corpora/general/heldout.txt` ({_kb(held_size)}) |
| Django 3.2 documentation | `python-django-doc` ({v['python-django-doc']}) | BSD-3-Clause | pretraining the base; general held-out | (same file) |
| King James Bible (1611), Genesis to Esther | `bible-kjv-text` ({v['bible-kjv-text']}), read with `bible` from `bible-kjv` ({v['bible-kjv']}) | public domain (copyright expired; the Debian copyright file says so) | domain corpus `kjv` | `corpora/kjv/train.txt` ({_kb(ds['kjv'][0])}), `heldout.txt` ({_kb(ds['kjv'][1])}) |
| The Jargon File 4.4.7 (2003) | `dict-jargon` ({v['dict-jargon']}) | public domain (dedicated by its maintainers; the Debian copyright file quotes the dedication) | domain corpus `jargon` | `corpora/jargon/train.txt` ({_kb(ds['jargon'][0])}), `heldout.txt` ({_kb(ds['jargon'][1])}) |
| The Devil's Dictionary, Ambrose Bierce (1911) | `dict-devil` ({v['dict-devil']}) | public domain (copyright expired) | domain corpus `devil` | `corpora/devil/train.txt` ({_kb(ds['devil'][0])}), `heldout.txt` ({_kb(ds['devil'][1])}) |

The base model (`base/`) was pretrained on the Python and Django documentation only. None of
the three domain texts, nor the general held-out pages, is in its pretraining text or in the
text its tokenizer was trained on. As a check, the share of word 13-grams of each held-out
file that also occur in the pretraining text is: {overlap}.

## General English: Python and Django documentation

- Files read: `/usr/share/doc/python3.11/html/**/*.html` and
  `/usr/share/doc/python-django-doc/html/**/*.html` (Sphinx HTML). Skipped: indexes, search
  pages, generated source listings (`_modules/`), Django release notes (`releases/`), the
  Python changelog (`whatsnew/changelog.html`) and the licence, copyright, about, bugs and
  contents pages.
- Cleaning: only the main column of each page is read; of it only paragraphs, list items and
  headings are kept. Code blocks, interactive sessions, tables, API signatures, permalinks,
  admonition titles, sidebars and navigation are dropped. Whitespace is collapsed,
  "(Contributed by ...)" credits are removed, and a paragraph is kept only if it has at
  least 4 words and at least 80% letters or spaces. Pages left with under 500 characters are
  dropped. One page is one document.
- Pretraining text: {py_pages} Python pages ({_kb(py_train)}) and {dj_pages} Django pages
  ({_kb(dj_train)}), {report['stream_tokens']:,} tokens. Not shipped (it is rebuilt from the packages).
- `corpora/general/heldout.txt`: {len(held)} whole pages (each under 30 KB) drawn by a seeded
  shuffle until about 150 KB, removed from the pretraining text: {', '.join(rel for _, rel, _ in held)}.
- Licences: Python's documentation is under the PSF License Agreement ("Copyright (c)
  2001-2023 Python Software Foundation; All Rights Reserved"; full text in
  `LICENSES/PSF-2.0-python-docs.txt`). Django's documentation is under the BSD-3-Clause
  licence of the Django Software Foundation and individual contributors (full text in
  `LICENSES/BSD-3-Clause-django-docs.txt`). Summary of changes, as the PSF licence asks: the
  text was extracted from HTML and cleaned as above; the model weights are derived from it by
  training.

## Domain corpora

Each corpus is cut into contiguous chunks of whole units (KJV: chapters, about 20 KB a chunk;
Jargon File: entries, about 10 KB; Devil's Dictionary: entries, about 5 KB), in the text's own
order. Every tenth chunk (the 6th, 16th, 26th, ...) is `heldout.txt`; the rest is `train.txt`.
So held-out text is whole passages that the training file never contains.

- `kjv`: `/usr/lib/bible.data` from `bible-kjv-text`, printed verse by verse with
  `bible -f Gen1:1-Rev22:21` (program from `bible-kjv`). Kept: the books Genesis to Esther
  (the historical books, about 1.9 MB). Verse references are removed; each chapter is a
  heading line ("Genesis 1") followed by one verse a line; chapters are separated by a blank
  line. Licence: the King James Version text is public domain (the Debian copyright file:
  "The copyright for the King James Version text of the Bible is expired"). The `bible`
  program is GPL-2+, but it is only used to read the text and is not shipped.
- `jargon`: `/usr/share/dictd/jargon.dict.dz` (dictd database of The Jargon File 4.4.7).
  Entries in file order, without the database header entries. Each entry is its headword with
  pronunciation and part of speech on one line, then the definition with wrapped lines
  rejoined into paragraphs; indented examples keep their lines; `{{cross reference}}` braces
  are removed. Licence: public domain ("This document (the Jargon File) is in the public
  domain, to be freely used, shared, and modified").
- `devil`: `/usr/share/dictd/devil.dict.dz` (The Devil's Dictionary, Internet Wiretap
  edition of the 1911 text). Entries in file order, without the database header (the
  Wiretap title page and preface). Prose is rejoined into paragraphs; quoted verse keeps its
  lines; verse signatures become "-- G.J.". Licence: public domain ("A Public Domain Text,
  Copyright Expired").

## Base model (`base/`)

- Llama architecture (transformers `LlamaForCausalLM`): vocabulary {shape['vocab_size']},
  hidden size {shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads, MLP size {shape['intermediate_size']},
  up to {shape['max_position_embeddings']} positions, RoPE, tied input and output embeddings;
  {report['parameters']:,} parameters.
- Files: weights in bfloat16 safetensors ({report['disk_bytes'] / 1e6:.1f} MB directory); `config.json`
  has `"dtype": "float32"`, so `from_pretrained` loads float32 weights by default (the model
  was trained in float32, and bf16 is slow on CPUs without AMX / AVX-512 BF16).
- Tokenizer: byte-level BPE trained with the `tokenizers` library on the pretraining text
  only; `<pad>` = 0, `<s>` = 1 (prepended when encoding), `</s>` = 2. No chat template.
- Pretraining: {tr['steps']} AdamW steps of {tr['batch_size']} x {tr['seq_len']} tokens ({report['tokens_seen']:,} tokens),
  peak learning rate {tr['lr']}, {tr['warmup']} warmup steps then cosine decay, weight decay
  {tr['weight_decay']}, gradient clipping {tr['grad_clip']}, seed {tr['seed']}; {report['device'].upper()}, {report['train_seconds'] / 60:.0f} minutes.
- Licence of the weights and tokenizer: derived from the texts above; they carry the PSF and
  BSD-3-Clause notices in `LICENSES/`.
"""
    (out / "PROVENANCE.md").write_text(re.sub(r"[ \t]+\n", "\n", text), encoding="utf-8")
