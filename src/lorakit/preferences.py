"""Preference data: answers judged good or bad one by one (KTO), and pairs of a chosen and a rejected answer (DPO).

`.jsonl`, one JSON object a line, written as TRL's datasets are:

KTO (`--objective kto`), an answer and its label: "good" / "bad" (also TRL's true / false)
    {"prompt": "The sky is", "completion": " blue.", "label": "good"}
    {"prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", "content": "..."}],
     "label": false}
    {"messages": [...a conversation...], "label": "bad"}      the label judges the last message, the assistant's

DPO (`--objective dpo`), one prompt and two answers
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    {"chosen": "The sky is blue.", "rejected": "The sky is green."}          implicit prompt: the common beginning
    {"prompt": [...messages...], "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}
    {"chosen": [...conversation...], "rejected": [...conversation...]}      implicit prompt: the common messages

Tokens are those `sft` gives the same prompt and answer (`lorakit.data`: text prompt + completion + the
end-of-text token, or the chat template), so a preference run that continues an SFT adapter sees what it
was trained on. The loss is on the completion's tokens only. A record is cut to `seq_len` at the end
of its completion; one whose prompt leaves no completion token inside `seq_len` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.data import DataStats, Example, chat_example, json_records, prompt_completion_example
from lorakit.errors import UserError
from lorakit.files import open_regular
from lorakit.losses import IGNORE

LABELS = {"good": True, "bad": False, True: True, False: False}


@dataclass
class Judged:
    """A KTO record: prompt tokens, the completion (labels IGNORE where not learned), good or bad."""

    prompt: list[int]
    completion: Example
    good: bool


@dataclass
class Pair:
    """A DPO record: prompt tokens and two completions, the chosen one preferred."""

    prompt: list[int]
    chosen: Example
    rejected: Example


def joined(prompt: list[int], completion: Example, seq_len: int) -> Example:
    """One training row: the prompt (no loss) then the completion, at most `seq_len` tokens."""
    ids = (prompt + completion.input_ids)[:seq_len]
    labels = ([IGNORE] * len(prompt) + completion.labels)[:seq_len]
    return Example(ids, labels)


def load_preferences(path: str | Path, tokenizer, seq_len: int, objective: str) -> tuple[list, DataStats]:
    """Read a .jsonl file of KTO records (`objective="kto"`) or DPO pairs ("dpo"). UserError for anything unusable."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise UserError(f"{path}: --objective {objective} reads .jsonl records "
                        + ("(prompt, completion, label)" if objective == "kto" else "(prompt, chosen, rejected)"))
    stats = DataStats()
    items: list[Judged | Pair] = []
    try:
        with open_regular(path, "data file") as f:  # a FIFO or a directory is refused, never read
            for number, record in json_records(f, path):
                where = f"{path}:{number}"
                stats.records += 1
                item, kind = _judged(record, tokenizer, where) if objective == "kto" else _pair(record, tokenizer, where)
                stats.formats[kind] = stats.formats.get(kind, 0) + 1
                if isinstance(item, Judged):
                    stats.good += item.good
                    stats.bad += not item.good
                    completions = [item.completion]
                else:
                    completions = [item.chosen, item.rejected]
                for completion in completions:
                    _check_fits(item.prompt, completion, seq_len, where, stats)
                items.append(item)
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
    if not items:
        raise UserError(f"{path} holds no records; add JSON lines as `lorakit train --help` shows for --objective")
    stats.used = len(items)
    return items, stats


def _check_fits(prompt: list[int], completion: Example, seq_len: int, where: str, stats: DataStats) -> None:
    row = joined(prompt, completion, seq_len)
    if all(t == IGNORE for t in row.labels[1:]):
        raise UserError(f"{where}: the prompt ({len(prompt)} tokens) leaves no completion token within the sequence "
                        f"length {seq_len}; raise --seq-len or shorten the prompt")
    stats.truncated += len(prompt) + len(completion.input_ids) > seq_len
    stats.tokens += len(row.input_ids)
    stats.loss_tokens += sum(t != IGNORE for t in row.labels[1:])


def _label(record: dict, where: str) -> bool:
    if "label" not in record:
        raise UserError(f"{where}: record has no 'label'; --objective kto needs each answer judged \"good\" or \"bad\"")
    label = record["label"]
    if not isinstance(label, (str, bool)) or label not in LABELS:
        raise UserError(f"{where}: 'label' must be \"good\" or \"bad\" (or true / false), got {label!r}")
    return LABELS[label]


def _judged(record: dict, tokenizer, where: str) -> tuple[Judged, str]:
    """A KTO record: prompt + completion, or a conversation whose last message is the judged answer."""
    good = _label(record, where)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "assistant":
            raise UserError(f"{where}: 'messages' must end with the assistant's answer that the label judges")
        example = chat_example(messages, tokenizer, where, learn_from=len(messages) - 1)
        kind = "chat"
    else:
        for key in ("prompt", "completion"):
            if key not in record:
                raise UserError(f"{where}: record has no '{key}'; KTO records are "
                                "{\"prompt\", \"completion\", \"label\"} or {\"messages\", \"label\"}")
        example, kind = _prompt_and_answer(record["prompt"], record["completion"], "completion", tokenizer, where)
    prompt, completion = _split(example, where)
    return Judged(prompt, completion, good), kind


def _pair(record: dict, tokenizer, where: str) -> tuple[Pair, str]:
    """A DPO record; without 'prompt', the prompt is what chosen and rejected begin with (TRL's rule)."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise UserError(f"{where}: record has no '{key}'; DPO records are "
                            "{\"prompt\", \"chosen\", \"rejected\"} (without 'prompt': the common beginning)")
    chosen, rejected = record["chosen"], record["rejected"]
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same; nothing to prefer")
    prompt = record["prompt"] if "prompt" in record else _implicit_prompt(chosen, rejected, where)
    if "prompt" not in record:
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    c, kind = _prompt_and_answer(prompt, chosen, "chosen", tokenizer, where)
    r, _ = _prompt_and_answer(prompt, rejected, "rejected", tokenizer, where)
    # Both share the prompt's tokens; a chat template that rendered it differently ends it where they part.
    shared = min(_first_learned(c, where), _first_learned(r, where), _common_prefix(c.input_ids, r.input_ids))
    return Pair(c.input_ids[:shared], _tail(c, shared), _tail(r, shared)), kind


def _prompt_and_answer(prompt, answer, field: str, tokenizer, where: str) -> tuple[Example, str]:
    if isinstance(prompt, str) and isinstance(answer, str):
        if not answer.strip():
            raise UserError(f"{where}: '{field}' is empty; give it the answer's text or drop the record")
        return prompt_completion_example(prompt, answer, tokenizer), "text"
    if isinstance(prompt, list) and isinstance(answer, list):
        return chat_example(prompt + answer, tokenizer, where, learn_from=len(prompt)), "chat"
    raise UserError(f"{where}: 'prompt' and '{field}' must both be text or both be lists of "
                    "{\"role\", \"content\"} messages")


def _implicit_prompt(chosen, rejected, where: str):
    """The common beginning of chosen and rejected: messages for conversations, characters for text,
    where text keeps a space that starts the answers with the answers (as TRL's `extract_prompt`)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = _common_prefix(chosen, rejected)
        return chosen[:n]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = _common_prefix(chosen, rejected)
        if n > 0 and chosen[n - 1] == " ":
            n -= 1
        return chosen[:n]
    raise UserError(f"{where}: 'chosen' and 'rejected' must both be text or both be lists of messages")


def _split(example: Example, where: str) -> tuple[list[int], Example]:
    first = _first_learned(example, where)
    return example.input_ids[:first], _tail(example, first)


def _first_learned(example: Example, where: str) -> int:
    first = next((i for i, t in enumerate(example.labels) if t != IGNORE), len(example.labels))
    if first == 0:  # nothing before it to predict it from
        raise UserError(f"{where}: the prompt is empty and this tokenizer adds no start token; give the record a prompt")
    return first


def _tail(example: Example, start: int) -> Example:
    return Example(example.input_ids[start:], example.labels[start:])


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
