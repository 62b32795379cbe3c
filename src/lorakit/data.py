"""Training data: files -> token sequences with loss masks -> batches.

Formats (chosen by the file's extension and each record's keys):
- `.txt`: the whole text, tokenized and packed into rows of exactly `seq_len` tokens; every token
  is learned. Lines that are not valid UTF-8 are skipped and counted.
- `.jsonl`, one JSON object a line:
  - `{"text": ...}`: like a .txt document (packed; loss on every token).
  - `{"prompt": ..., "completion": ...}`: loss on the completion (and the end-of-text token) only.
  - `{"messages": [{"role": ..., "content": ...}, ...]}`: chat; loss on the assistant turns only.
    Uses the tokenizer's chat template when it has one, else `SIMPLE_CHAT_TEMPLATE` below.
  - optional `"label": "good" | "bad"` (annotated history): only unlabelled and good records are
    used unless `labels="all"`; the counts are reported.
Records are one row each (truncated to `seq_len`, padded per batch); text is packed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.errors import UserError
from lorakit.files import open_regular
from lorakit.losses import IGNORE  # the label the loss skips: no loss on prompts, other turns, padding

# The documented fallback chat format for tokenizers without a chat template. Each turn is
# "### Role:\n<content>\n\n"; assistant content is followed by the end-of-text token, so the model
# learns to stop. Only assistant content (and that token) carries loss.
SIMPLE_CHAT_TEMPLATE = "### {role}:\n{content}"
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training row: token ids and labels (IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    records: int = 0
    used: int = 0
    good: int = 0
    bad: int = 0
    unlabelled: int = 0
    skipped_bad_label: int = 0
    skipped_non_utf8_lines: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.used} rows from {self.records} records", f"{self.loss_tokens:,} loss tokens"]
        if self.good or self.bad:
            parts.append(f"labels: {self.good} good, {self.bad} bad, {self.unlabelled} unlabelled"
                         + (f" ({self.skipped_bad_label} bad skipped)" if self.skipped_bad_label else ""))
        if self.skipped_non_utf8_lines:
            parts.append(f"{self.skipped_non_utf8_lines} non-UTF-8 lines skipped")
        if self.truncated:
            parts.append(f"{self.truncated} records truncated to the sequence length")
        return ", ".join(parts)


def load_examples(path: str | Path, tokenizer, seq_len: int, labels: str = "good") -> tuple[list[Example], DataStats]:
    """Read a .txt or .jsonl file into training rows. Raises UserError for anything unusable."""
    path = Path(path)
    if labels not in ("good", "all"):
        raise UserError(f"labels must be 'good' or 'all', got {labels!r}")
    stats = DataStats()
    if path.suffix not in (".jsonl", ".txt", ".text", ".md", ""):
        raise UserError(f"{path}: unsupported data format {path.suffix!r}; use .txt or .jsonl")
    if seq_len < 2:  # a row of one token has no next token to learn or score
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    try:
        with open_regular(path, "data file") as f:  # a FIFO or a directory is refused, never read
            if path.suffix == ".jsonl":
                texts, rows = _read_jsonl(f, path, tokenizer, labels, stats)
            else:
                texts, rows = [_read_text(f, path, stats)], []
                stats.records = 1
                stats.formats["text"] = 1
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
    examples = _pack(texts, tokenizer, seq_len) + [_fit(r, seq_len, stats) for r in rows]
    if not examples:
        raise UserError(f"{path}: no training rows (the data is empty or too short); add text")
    stats.used = len(examples)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.loss_tokens = sum(sum(1 for t in e.labels if t != IGNORE) for e in examples)
    return examples, stats


def _read_text(f, path: Path, stats: DataStats) -> str:
    lines = []
    for raw in f:
        if b"\x00" in raw:  # no text has NUL bytes: a binary file, or UTF-16/32
            raise UserError(f"{path} looks like a binary file (NUL bytes); give UTF-8 text")
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            stats.skipped_non_utf8_lines += 1
    text = "".join(lines)
    if not text.strip():
        raise UserError(f"{path} is empty (or holds no UTF-8 text); give it some text to learn from")
    return text


def json_records(f, path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of the open .jsonl file `f`; UserError naming the line otherwise."""
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{path}:{number}: line is not valid UTF-8; fix or remove it") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: broken JSON ({err.msg}); fix or remove that line") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: broken JSON (nested too deeply); fix or remove that line") from None
        except ValueError:  # a number beyond Python's 4300-digit limit
            raise UserError(f"{path}:{number}: broken JSON (a number with too many digits); fix or remove "
                            "that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if b"\\ud" in raw.lower() and not _encodable(record):  # JSON escapes can spell half a character
            raise UserError(f"{path}:{number}: a \\uD800-\\uDFFF escape without its pair is not text; "
                            "fix or remove that line")
        yield number, record


def _encodable(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _read_jsonl(f, path: Path, tokenizer, labels: str, stats: DataStats) -> tuple[list[str], list[Example]]:
    texts: list[str] = []
    rows: list[Example] = []
    for number, record in json_records(f, path):
        stats.records += 1
        label = record.get("label")
        if label not in (None, "good", "bad"):
            raise UserError(f"{path}:{number}: label must be 'good' or 'bad', got {str(label)[:40]!r}")
        stats.good += label == "good"
        stats.bad += label == "bad"
        stats.unlabelled += label is None
        if label == "bad" and labels == "good":
            stats.skipped_bad_label += 1
            continue
        kind, item = _record(record, tokenizer, f"{path}:{number}")
        stats.formats[kind] = stats.formats.get(kind, 0) + 1
        if kind == "text":
            texts.append(item)
        else:
            rows.append(item)
    if stats.records == 0:
        raise UserError(f"{path} holds no records; add JSON lines with 'text', 'prompt'/'completion' or 'messages'")
    return texts, rows


def _record(record: dict, tokenizer, where: str) -> tuple[str, str | Example]:
    if "messages" in record:
        return "chat", chat_example(record["messages"], tokenizer, where)
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt", ""), record.get("completion", "")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise UserError(f"{where}: 'prompt' and 'completion' must be strings")
        if not completion.strip():
            raise UserError(f"{where}: record has no completion to learn from; fill in 'completion' or drop it")
        return "prompt_completion", prompt_completion_example(prompt, completion, tokenizer)
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise UserError(f"{where}: 'text' is empty or not a string; fill it in or drop the record")
        return "text", record["text"]
    raise UserError(f"{where}: record needs 'text', 'prompt'/'completion' or 'messages' (has {sorted(record)})")


def prompt_completion_example(prompt: str, completion: str, tokenizer) -> Example:
    """Tokens of a prompt (no loss) and its completion plus the end-of-text token (learned)."""
    return _segments([(prompt, False), (completion, True)], tokenizer, eos_learned=True)


def chat_example(messages, tokenizer, where: str = "messages", learn_from: int = 0) -> Example:
    """Tokens of a conversation with loss on the assistant turns only (those from message `learn_from` on)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: each message needs a role in {ROLES} and a string content; got {m!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages[learn_from:]):
        raise UserError(f"{where}: conversation has no assistant turn to learn from; add one or drop it")
    if getattr(tokenizer, "chat_template", None):
        # A chat template writes its own start token into the text; the tokenizer must not add another.
        example = _segments(_template_segments(messages, tokenizer), tokenizer, eos_learned=False, specials=False)
        before = _template_segments(messages[:learn_from], tokenizer) if learn_from else []
        seen = len(_segments(before, tokenizer, eos_learned=False, specials=False).input_ids)
    else:
        example = _segments(simple_chat_segments(messages), tokenizer, eos_learned=False, eos_after_assistant=True)
        before = simple_chat_segments(messages[:learn_from]) if learn_from else []
        seen = len(_segments(before, tokenizer, eos_learned=False, eos_after_assistant=True).input_ids)
    # Pieces are tokenized one by one, so the first messages' tokens are exactly a prefix: no loss there.
    example.labels[:seen] = [IGNORE] * seen
    return example


def simple_chat_segments(messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """(text, learned) pieces of the simple template; assistant content is learned."""
    pieces: list[tuple[str, bool]] = []
    for m in messages:
        header = SIMPLE_CHAT_TEMPLATE.format(role=m["role"].capitalize(), content="")
        prefix = "\n\n" if pieces else ""
        pieces.append((prefix + header, False))
        pieces.append((m["content"], m["role"] == "assistant"))
    if add_generation_prompt:
        pieces.append(("\n\n" + SIMPLE_CHAT_TEMPLATE.format(role="Assistant", content=""), False))
    return pieces


def render_chat_prompt(messages: list[dict], tokenizer) -> str:
    """The prompt text that asks the model for the next assistant turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(text for text, _ in simple_chat_segments(messages, add_generation_prompt=True))


def _template_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split the tokenizer's rendering into pieces: each assistant turn's own text is learned."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            pieces.append((before[len(done):], False))
            done = before
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(done):
            raise UserError("the tokenizer's chat template does not render conversations incrementally; "
                            "use prompt/completion records instead")
        pieces.append((full[len(done):], m["role"] == "assistant"))
        done = full
    return [(t, learned) for t, learned in pieces if t]


def _segments(pieces: list[tuple[str, bool]], tokenizer, eos_learned: bool,
              eos_after_assistant: bool = False, specials: bool = True) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    for text, learned in pieces:
        # The tokenizer's own start token (if it adds one, like Llama's <s>) opens each record.
        tokens = tokenizer(text, add_special_tokens=specials and not ids).input_ids if text else []
        if learned and eos_after_assistant:
            tokens = tokens + [eos]
        ids += tokens
        labels += tokens if learned else [IGNORE] * len(tokens)
    if eos_learned:
        ids.append(eos)
        labels.append(eos)
    return Example(ids, labels)


def _pack(texts: list[str], tokenizer, seq_len: int) -> list[Example]:
    """Concatenate documents (each opened as the tokenizer opens text, ended by EOS) into rows of seq_len."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, verbose=False).input_ids  # long on purpose: it is cut into rows below
        stream.append(tokenizer.eos_token_id)
    rows = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    tail = stream[len(rows) * seq_len:]
    if len(tail) > 1 and (not rows or len(tail) >= seq_len // 4):
        rows.append(tail)  # keep a short text's tokens rather than dropping them
    return [Example(list(r), list(r)) for r in rows]


def _fit(example: Example, seq_len: int, stats: DataStats) -> Example:
    if len(example.input_ids) > seq_len:
        stats.truncated += 1
        example = Example(example.input_ids[:seq_len], example.labels[:seq_len])
    if all(t == IGNORE for t in example.labels[1:]):
        raise UserError("a record's learned part falls beyond the sequence length; raise --seq-len or shorten it")
    return example


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffled order of rows in an epoch: a function of (seed, epoch) only, so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_at(examples: list[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The rows of global micro-batch number `step` (epochs wrap, reshuffled each time)."""
    n = len(examples)
    picked = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(k, n)
        picked.append(examples[epoch_order(n, seed, epoch)[index]])
    return picked
