"""Data formats, loss masks, labels, batching order and bad input."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lorakit.data import batch_at, collate, load_examples
from lorakit.losses import IGNORE
from lorakit.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _learned(tok, example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE])


def test_text_is_packed_into_full_rows_with_loss_everywhere(tok, tmp_path):
    path = tmp_path / "d.txt"
    text = "The ship sailed at dawn. " * 40
    path.write_text(text)
    examples, stats = load_examples(path, tok, seq_len=16)
    assert all(len(e.input_ids) == 16 for e in examples)
    assert all(e.labels == e.input_ids for e in examples)
    assert stats.loss_tokens == stats.tokens == 16 * len(examples)
    stream = [t for e in examples for t in e.input_ids]
    full = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert stream == full[: len(stream)] and len(full) - len(stream) < 16


def test_prompt_completion_learns_only_the_completion(tok, tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "Q: where? A:", "completion": " north"}])
    (example,), _ = load_examples(path, tok, seq_len=64)
    assert tok.decode(example.input_ids) == "Q: where? A: north</s>"
    assert _learned(tok, example) == " north</s>"
    assert example.labels[0] == IGNORE


def test_chat_simple_template_learns_assistant_turns(tok, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "farewell"}]
    path = _write(tmp_path / "d.jsonl", [{"messages": messages}])
    (example,), _ = load_examples(path, tok, seq_len=128)
    full = tok.decode(example.input_ids)
    assert full.startswith("### System:\nBe brief.\n\n### User:\nhi\n\n### Assistant:\nhello</s>")
    assert _learned(tok, example) == "hello</s>farewell</s>"


def test_chat_uses_the_tokenizers_template_when_it_has_one(tiny_base, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = _write(tmp_path / "d.jsonl", [{"messages": messages}])
    (example,), _ = load_examples(path, tok, seq_len=128)
    assert tok.decode(example.input_ids) == "<user>hi</s><assistant>hello</s>"
    assert _learned(tok, example) == "hello</s>"


def test_labels_good_and_bad(tok, tmp_path):
    rows = [{"text": "good one", "label": "good"}, {"text": "bad one", "label": "bad"}, {"text": "plain"}]
    path = _write(tmp_path / "d.jsonl", rows)
    _, stats = load_examples(path, tok, seq_len=8)
    assert (stats.good, stats.bad, stats.unlabelled, stats.skipped_bad_label) == (1, 1, 1, 1)
    assert "bad one" not in tok.decode([t for e in load_examples(path, tok, 8)[0] for t in e.input_ids])
    everything = load_examples(path, tok, 8, labels="all")[0]
    assert "bad one" in tok.decode([t for e in everything for t in e.input_ids])


def test_non_utf8_text_lines_are_skipped_and_counted(tok, tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"fine line of text here\n\xff\xfe broken\nanother fine line\n")
    examples, stats = load_examples(path, tok, seq_len=8)
    assert stats.skipped_non_utf8_lines == 1
    assert "broken" not in tok.decode([t for e in examples for t in e.input_ids])


BAD = {
    "missing": (None, "not found"),
    "a directory": (("dir.txt", None), "is a directory"),
    "empty txt": (("d.txt", b"   \n"), "empty"),
    "broken json": (("d.jsonl", b'{"text": "a"}\n{"text": \n'), r"d\.jsonl:2: broken JSON"),
    "non-utf8 jsonl": (("d.jsonl", b'{"text": "a"}\n\xff\n'), r":2: line is not valid UTF-8"),
    "half a character": (("d.jsonl", b'{"text": "a"}\n{"text": "a\\ud800b"}\n'), r":2: a \\uD800-\\uDFFF escape"),
    "no completion": (("d.jsonl", b'{"prompt": "a", "completion": ""}\n'), "no completion"),
    "unknown record": (("d.jsonl", b'{"question": "a"}\n'), "needs 'text'"),
    "no assistant": (("d.jsonl", b'{"messages": [{"role": "user", "content": "x"}]}\n'), "no assistant turn"),
    "bad role": (("d.jsonl", b'{"messages": [{"role": "bot", "content": "x"}]}\n'), "role"),
    "bad label": (("d.jsonl", b'{"text": "a", "label": "meh"}\n'), "label must be"),
    "csv": (("d.csv", b"a,b\n"), "unsupported data format"),
    "empty jsonl": (("d.jsonl", b"\n\n"), "no records"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_fails_with_a_clear_message(case, tok, tmp_path):
    spec, message = BAD[case]
    path = tmp_path / "nothing.txt"
    if spec:
        path = tmp_path / spec[0]
        if spec[1] is None:
            path.mkdir()
        else:
            path.write_bytes(spec[1])
    with pytest.raises(UserError, match=message):
        load_examples(path, tok, seq_len=16)


def test_batches_follow_a_seeded_epoch_order(tok, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("word " * 400)
    examples, _ = load_examples(path, tok, seq_len=8)
    n = len(examples)
    epoch = [id(e) for step in range(n) for e in batch_at(examples, step, 1, seed=3)]
    assert sorted(epoch) == sorted(id(e) for e in examples)  # one epoch sees every row once
    assert epoch != [id(e) for e in examples]  # shuffled
    assert [id(e) for e in batch_at(examples, 5, 4, seed=3)] == [id(e) for e in batch_at(examples, 5, 4, seed=3)]
    assert [id(e) for e in batch_at(examples, 0, 4, seed=3)] != [id(e) for e in batch_at(examples, 0, 4, seed=4)]


def test_collate_pads_and_masks(tok):
    from lorakit.data import Example

    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
