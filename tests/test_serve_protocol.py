"""OpenAI request checks and the stop-string text stream, without a server."""

from __future__ import annotations

import pytest

from lorakit.serve.protocol import ApiError, TextStream, parse_request


class CharTokenizer:
    """One token per character (ids are code points); a Metaspace-like mode drops a leading space."""

    def __init__(self, strip_leading_space: bool = False):
        self.strip = strip_leading_space

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(chr(i) for i in ids)
        return text[1:] if self.strip and text.startswith(" ") else text


def run(stream: TextStream, text: str) -> str:
    out = "".join(stream.add(ord(c)) for c in text if not stream.stopped)
    return out + stream.flush()


@pytest.mark.parametrize("text, stops, expected", [
    ("hello world", [], "hello world"),
    ("hello world", ["wor"], "hello "),
    ("hello world", ["xyz", "lo w"], "hel"),
    ("hello world", ["world!"], "hello world"),  # a stop string that never completes: everything comes out
    ("aaab", ["aab"], "a"),  # overlapping prefixes
    ("end.", ["."], "end"),
])
def test_text_stream_cuts_before_the_first_stop_string(text, stops, expected):
    assert run(TextStream(CharTokenizer(), stops), text) == expected


def test_text_stream_never_shows_the_start_of_a_stop_string_too_early():
    stream = TextStream(CharTokenizer(), ["STOP"])
    shown = [stream.add(ord(c)) for c in "abST"]
    assert "".join(shown) == "ab"  # "ST" may begin "STOP": held back
    assert stream.add(ord("x")) == "STx"  # it did not: released


def test_text_stream_keeps_a_leading_space_that_a_sentencepiece_decoder_would_drop():
    tokenizer = CharTokenizer(strip_leading_space=True)
    stream = TextStream(tokenizer, [], context=[ord(c) for c in "The ship"])
    assert run(stream, " sailed") == " sailed"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "seed": True}, "seed"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ({"model": "m", "prompt": "x", "adapters": ["a"]}, "adapters"),
    ({"model": "m", "prompt": "x", "adapters": {"a": 99}}, "adapters.a"),
])
def test_bad_completion_fields_name_the_field(body, param):
    with pytest.raises(ApiError) as err:
        parse_request(body, chat=False)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("messages", [None, [], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]])
def test_bad_chat_messages_are_refused(messages):
    with pytest.raises(ApiError) as err:
        parse_request({"model": "m", "messages": messages}, chat=True)
    assert err.value.param == "messages"


def test_defaults_and_accepted_forms():
    params = parse_request({"model": "m", "prompt": ["one prompt"], "n": 1, "logprobs": None, "temperature": None,
                            "stop": "\n", "user": "someone", "top_k": -1}, chat=False)
    assert (params.prompt, params.max_tokens, params.temperature, params.stop, params.top_k) == (
        "one prompt", 16, 1.0, ["\n"], 0)
    chat = parse_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 7}, chat=True)
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert chat.max_tokens == 7
