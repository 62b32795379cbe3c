"""Text for the embedded base model, taken from Debian packages and cleaned.

Every text here is public domain or under a permissive licence; see
src/lorakit/assets/PROVENANCE.md for the package versions and licences.

- General English (pretraining): the Python 3.11 documentation (PSF licence) and the
  Django 3.2 documentation (BSD-3-Clause), extracted from their Sphinx HTML: prose
  paragraphs and headings only; code blocks, tables, signatures and navigation dropped.
- Domain corpora (never pretrained on): the King James Bible (bible-kjv), the Jargon
  File (dict-jargon) and The Devil's Dictionary (dict-devil).

Splits are made of contiguous chunks (whole pages, chapters, runs of entries), never
random lines, so a held-out file shares no passage with its training file.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

DEBIAN_PACKAGES = ["python3.11-doc", "python-django-doc", "bible-kjv", "bible-kjv-text",
                   "dict-jargon", "dict-devil"]

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html")
DJANGO_DOCS = Path("/usr/share/doc/python-django-doc/html")
DICTD = Path("/usr/share/dictd")

# Pages that are indexes, generated source listings, changelogs or licence text.
SKIP_PAGES = re.compile(
    r"^(_modules|_static|_sources|releases)/|^(genindex|search|py-modindex|license|copyright"
    r"|bugs|about|contents)\.html$|^whatsnew/changelog\.html$"
)


# ---------------------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------------------

def ensure_debian_packages() -> None:
    """Install the Debian packages that hold the texts, if any is missing."""
    missing = [p for p in DEBIAN_PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SystemExit(f"missing Debian packages {missing} and no apt-get to install them")
    print(f"installing Debian packages: {' '.join(missing)}", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})


def package_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                         capture_output=True, text=True, check=True)
    return out.stdout


# ---------------------------------------------------------------------------------------
# General English: Sphinx HTML documentation
# ---------------------------------------------------------------------------------------

class _SphinxProse(HTMLParser):
    """Collects the prose paragraphs and headings of one Sphinx page.

    Only text inside the main column is read (Python: div[role=main], Django:
    div#yui-main); within it, code, tables, API signatures and permalinks are skipped.
    """

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "li"}
    SKIP_TAGS = {"pre", "table", "dt", "script", "style", "nav", "button"}
    SKIP_CLASSES = {"highlight", "headerlink", "admonition-title", "code-block-caption",
                    "sphinxsidebar", "related", "footer", "topic-title", "rubric", "toctree-wrapper"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "wbr", "source", "area", "base"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, opens main, skips)
        self.in_main = 0
        self.skipping = 0
        self.blocks: list[list[str]] = []
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        opens_main = a.get("role") == "main" or a.get("id") == "yui-main"
        skips = tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES) or any(
            c.startswith("highlight") for c in classes)
        self.stack.append((tag, opens_main, skips))
        self.in_main += opens_main
        self.skipping += skips
        if tag in self.BLOCKS:
            self.blocks.append([])

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        # Pop up to and including the matching tag (tolerates unclosed inner tags).
        while self.stack:
            t, opens_main, skips = self.stack.pop()
            self.in_main -= opens_main
            self.skipping -= skips
            if t in self.BLOCKS and self.blocks:
                text = " ".join("".join(self.blocks.pop()).split())
                if text:
                    self.paragraphs.append(text)
            if t == tag:
                break

    def handle_data(self, data):
        if self.in_main and not self.skipping and self.blocks:
            self.blocks[-1].append(data)


_CONTRIBUTED = re.compile(r"\s*\((?:Contributed|Patch|Written|Original patch|Initial patch|"
                          r"Implemented|Suggested|Reported|Fixed)[^()]*(?:\([^()]*\)[^()]*)*\)")


def _is_prose(paragraph: str) -> bool:
    """A paragraph worth training on: several words, mostly letters, not a prompt line."""
    words = paragraph.split()
    if len(words) < 4 or paragraph.startswith((">>>", "$ ", "...")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters / len(paragraph) >= 0.8


def sphinx_page_text(path: Path) -> str:
    parser = _SphinxProse()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    paragraphs = []
    for p in parser.paragraphs:
        p = _CONTRIBUTED.sub("", p.replace("\u00b6", "").replace("\u00a0", " ")).strip()
        if _is_prose(p):
            paragraphs.append(p)
    return "\n\n".join(paragraphs)


def sphinx_documents(root: Path) -> list[tuple[str, str]]:
    """(page path, text) for every content page under a Sphinx HTML tree, in path order."""
    docs = []
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root).as_posix()
        if SKIP_PAGES.search(rel):
            continue
        text = sphinx_page_text(path)
        if len(text) >= 500:
            docs.append((rel, text))
    return docs


# ---------------------------------------------------------------------------------------
# Domain texts
# ---------------------------------------------------------------------------------------

KJV_BOOKS = """Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel
1_Kings 2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes
Song_of_Solomon Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah
Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans
1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians 1_Thessalonians
2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John
3_John Jude Revelation""".split()
KJV_LAST_BOOK = "Esther"  # Genesis..Esther: the historical books, about 1.9 MB


def kjv_chapters() -> list[str]:
    """Chapters of the King James Bible, Genesis to Esther: a heading line, then one verse a line."""
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True, stdin=subprocess.DEVNULL).stdout
    chapters: list[tuple[str, list[str]]] = []
    book_index, last_abbrev = -1, None
    for line in out.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line)
        if not m:
            continue
        abbrev, chapter, verse, text = m.groups()
        if abbrev != last_abbrev:  # books come in canonical order; names follow the list
            book_index, last_abbrev = book_index + 1, abbrev
            if book_index > 0 and KJV_BOOKS[book_index - 1] == KJV_LAST_BOOK:
                break
        if verse == "1":
            chapters.append((f"{KJV_BOOKS[book_index].replace('_', ' ')} {chapter}", []))
        chapters[-1][1].append(" ".join(text.split()))
    return [heading + "\n" + "\n".join(verses) for heading, verses in chapters]


def _dictd_entries(name: str) -> list[str]:
    """Entries of a dictd database, in file order, without its 00-database header entries."""
    data = gzip.open(DICTD / f"{name}.dict.dz").read().decode("utf-8")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def b64(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + alphabet.index(c)
        return n

    spans = set()
    for line in (DICTD / f"{name}.index").read_text(encoding="utf-8").splitlines():
        head, offset, length = line.split("\t")
        if not head.startswith("00database") and not head.startswith("00-database"):
            spans.add((b64(offset), b64(length)))
    # dictd offsets count bytes, so slice the encoded text.
    raw = data.encode("utf-8")
    return [raw[o:o + n].decode("utf-8") for o, n in sorted(spans)]


def _reflow(lines: list[str], keep_indent_over: int) -> list[str]:
    """Join wrapped prose lines; lines indented deeper than keep_indent_over (verse, code) stay."""
    out: list[str] = []
    joinable = False
    for line in lines:
        indent = len(line) - len(line.lstrip())
        text = " ".join(line.split())
        if indent > keep_indent_over:
            out.append(text)
            joinable = False
        elif joinable:
            out[-1] += " " + text
        else:
            out.append(text)
            joinable = True
    return out


def _blocks(text: str) -> list[list[str]]:
    return [b.splitlines() for b in re.split(r"\n\s*\n", text) if b.strip()]


def jargon_entries() -> list[str]:
    """Jargon File 4.4.7 entries: 'headword /pron/, pos.' then the reflowed definition."""
    entries = []
    for raw in _dictd_entries("jargon"):
        blocks = _blocks(raw)
        if not blocks or not blocks[0]:
            continue
        head = blocks[0][0].strip()
        grammar = " ".join(l.strip() for l in blocks[0][1:])
        grammar = "" if grammar == "//" else grammar
        header = f"{head} {grammar}".strip()
        body = []
        for block in blocks[1:]:
            body.append("\n".join(_reflow(block, keep_indent_over=4)))
        text = header + "\n" + "\n\n".join(body)
        text = re.sub(r"\{\s*([^{}]*?)\s*\}", r"\1", text)  # cross references: {foo} -> foo
        text = re.sub(r"[ \t]+\n", "\n", text)
        entries.append(text.strip())
    return entries


def devil_entries() -> list[str]:
    """The Devil's Dictionary entries; prose reflowed, quoted verse kept line by line."""
    entries = []
    for raw in _dictd_entries("devil"):
        if not re.match(r"[A-Z]", raw):
            continue  # the alphabet pseudo-entry
        paragraphs = []
        for block in _blocks(raw):
            stripped = [l for l in block if l.strip()]
            if all(l.startswith(" ") for l in stripped):  # verse; drop the initials signature
                lines = [" ".join(l.split()) for l in stripped]
                if re.fullmatch(r"(?:[A-Z][a-z]?\.\s*)+", lines[-1]):
                    lines[-1] = "-- " + lines[-1]
                paragraphs.append("\n".join(lines))
            else:  # prose: a new paragraph starts at each indented line
                merged: list[str] = []
                for line in stripped:
                    if line.startswith(" ") or not merged:
                        merged.append(" ".join(line.split()))
                    else:
                        merged[-1] += " " + " ".join(line.split())
                paragraphs.extend(merged)
        entries.append("\n\n".join(paragraphs))
    return entries


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------

def chunked_split(units: list[str], chunk_chars: int, heldout_every: int,
                  sep: str = "\n\n") -> tuple[str, str]:
    """Group consecutive units into chunks of about chunk_chars; every heldout_every-th
    chunk (the middle one of each run) goes to held-out, the rest to train."""
    chunks: list[list[str]] = [[]]
    size = 0
    for u in units:
        if size >= chunk_chars:
            chunks.append([])
            size = 0
        chunks[-1].append(u)
        size += len(u)
    train, heldout = [], []
    for i, chunk in enumerate(chunks):
        (heldout if i % heldout_every == heldout_every // 2 else train).append(sep.join(chunk))
    return sep.join(train) + "\n", sep.join(heldout) + "\n"
