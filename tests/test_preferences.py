"""Preference records: KTO's judged answers and DPO's pairs, in TRL's standard and conversational formats."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lorakit.data import chat_example
from lorakit.errors import UserError
from lorakit.losses import IGNORE
from lorakit.preferences import Judged, Pair, load_preferences

USER = {"role": "user", "content": "What colour is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}


@pytest.fixture
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def _write(tmp_path, records, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _text(tokenizer, prompt, completion):
    return (tokenizer(prompt).input_ids,
            tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])


def test_kto_text_records_with_both_label_spellings(tmp_path, tokenizer):
    path = _write(tmp_path, [{"prompt": "The sky is", "completion": " blue.", "label": "good"},
                             {"prompt": "The sky is", "completion": " green.", "label": False},
                             {"prompt": "The sea is", "completion": " wet.", "label": True}])
    records, stats = load_preferences(path, tokenizer, 64, "kto")
    assert [r.good for r in records] == [True, False, True]
    assert (stats.good, stats.bad, stats.used) == (2, 1, 3)
    prompt, completion = _text(tokenizer, "The sky is", " blue.")
    assert records[0].prompt == prompt
    assert records[0].completion.input_ids == completion == records[0].completion.labels  # all of it learned


def test_kto_chat_records_judge_the_last_answer_only(tmp_path, tokenizer):
    history = [USER, BLUE, {"role": "user", "content": "And at night?"}, {"role": "assistant", "content": "Black."}]
    path = _write(tmp_path, [{"messages": history, "label": "bad"},
                             {"prompt": history[:3], "completion": history[3:], "label": "bad"}])
    (a, b), stats = load_preferences(path, tokenizer, 256, "kto")
    assert a == b and not a.good and stats.formats == {"chat": 2}
    whole = chat_example(history, tokenizer)
    assert a.prompt + a.completion.input_ids == whole.input_ids  # the same tokens sft gives the conversation
    learned = [t for t in a.completion.labels if t != IGNORE]
    assert tokenizer.decode(learned).strip().startswith("Black.")  # not the first answer


def test_dpo_explicit_and_implicit_prompts_give_the_same_pair(tmp_path, tokenizer):
    path = _write(tmp_path, [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                             {"chosen": "The sky is blue.", "rejected": "The sky is green."},
                             {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]},
                             {"chosen": [USER, BLUE], "rejected": [USER, GREEN]}])
    pairs, stats = load_preferences(path, tokenizer, 64, "dpo")
    assert pairs[0] == pairs[1] and pairs[2] == pairs[3]
    assert stats.formats == {"text": 2, "chat": 2}
    prompt, chosen = _text(tokenizer, "The sky is", " blue.")
    assert pairs[0].prompt == prompt and pairs[0].chosen.input_ids == chosen
    assert pairs[2].prompt + pairs[2].chosen.input_ids == chat_example([USER, BLUE], tokenizer).input_ids


def test_implicit_prompt_is_trls(tmp_path, tokenizer):
    """The prompt taken from chosen and rejected is the one TRL's extract_prompt takes."""
    trl = pytest.importorskip("trl")
    record = {"chosen": "Q: the sky? A: blue it is.", "rejected": "Q: the sky? A: bright green."}
    theirs = trl.extract_prompt(record)
    pair = load_preferences(_write(tmp_path, [record]), tokenizer, 64, "dpo")[0][0]
    want = load_preferences(_write(tmp_path, [theirs], "explicit.jsonl"), tokenizer, 64, "dpo")[0][0]
    assert pair == want


def test_long_records_are_cut_at_the_end_of_the_completion(tmp_path, tokenizer):
    path = _write(tmp_path, [{"prompt": "The sky is", "completion": " blue" * 40, "label": "good"}])
    records, stats = load_preferences(path, tokenizer, 16, "kto")
    assert stats.truncated == 1 and isinstance(records[0], Judged)
    assert isinstance(load_preferences(_write(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}]),
                                       tokenizer, 16, "dpo")[0][0], Pair)


@pytest.mark.parametrize("objective, record, message", [
    ("kto", {"prompt": "a", "completion": "b"}, ":2: record has no 'label'"),
    ("kto", {"prompt": "a", "label": "good"}, ":2: record has no 'completion'"),
    ("kto", {"completion": "a", "label": "good"}, ":2: record has no 'prompt'"),
    ("kto", {"prompt": "a", "completion": "b", "label": "ok"}, ":2: 'label' must be \"good\" or \"bad\""),
    ("kto", {"prompt": "a", "completion": "b", "label": 1}, ":2: 'label' must be"),
    ("kto", {"messages": [USER], "label": "good"}, ":2: 'messages' must end with the assistant's answer"),
    ("kto", {"prompt": [USER], "completion": "b", "label": "good"}, ":2: 'prompt' and 'completion' must both"),
    ("kto", {"prompt": "a", "completion": " ", "label": "good"}, ":2: 'completion' is empty"),
    ("kto", {"prompt": "a\ud800", "completion": "b", "label": "good"}, ":2: a \\uD800-\\uDFFF escape"),
    ("dpo", {"prompt": "a", "chosen": "b"}, ":2: record has no 'rejected'"),
    ("dpo", {"prompt": "a", "rejected": "b"}, ":2: record has no 'chosen'"),
    ("dpo", {"prompt": "a", "chosen": "b", "rejected": "b"}, ":2: 'chosen' and 'rejected' are the same"),
    ("dpo", {"chosen": [USER, BLUE], "rejected": "x"}, ":2: 'chosen' and 'rejected' must both be text"),
    ("dpo", {"prompt": "a " * 40, "chosen": "b", "rejected": "c"}, ":2: the prompt (41 tokens) leaves no completion"),
])
def test_bad_records_name_the_line_and_the_field(tmp_path, tokenizer, objective, record, message):
    good = {"kto": {"prompt": "a", "completion": "b", "label": "good"},
            "dpo": {"prompt": "a", "chosen": "b", "rejected": "c"}}[objective]
    path = _write(tmp_path, [good, record])
    with pytest.raises(UserError) as err:
        load_preferences(path, tokenizer, 16, objective)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_preferences_need_jsonl(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("text")
    with pytest.raises(UserError, match="reads .jsonl records"):
        load_preferences(path, tokenizer, 16, "dpo")
