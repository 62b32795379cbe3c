"""OpenAI request checks and the stop-string text stream, without a server."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@functools.cache
def real_tokenizers() -> dict:
    """The embedded base's byte-level BPE; a Llama-2/Mistral-style SentencePiece BPE (a word's space is part of its
    token, byte fallback, the text's leading space stripped, control tokens); a WordPiece one ('##' pieces
    glued, spaces between words added); both trained here on a few lines."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorakit.base import load_base

    _, embedded = load_base(None)
    lines = ["The ship sailed across the sea in 2023.", "Über die Brücke, naïve café. I'm sure it's fine.",
             "def f(x):\n    return x * 2  # 日本語 😀"] * 20
    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=["▁"]))
    spec = json.loads(sp.to_str())  # the 256 byte tokens as ordinary ones, as Llama's vocabulary has them
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    sp = Tokenizer.from_str(json.dumps(spec))
    sp.add_special_tokens(["[INST]", "[/INST]"])
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=False)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    return {"byte-level BPE": embedded,
            "llama-style": PreTrainedTokenizerFast(tokenizer_object=sp, clean_up_tokenization_spaces=False,
                                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
            "wordpiece": PreTrainedTokenizerFast(tokenizer_object=wp, clean_up_tokenization_spaces=False,
                                                 unk_token="[UNK]", sep_token="[SEP]", cls_token="[CLS]")}


@pytest.mark.parametrize("kind", ["byte-level BPE", "llama-style", "wordpiece"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_streamed_text_is_the_decoded_text(kind, data):
    """Token by token, the stream gives the text that decoding all the generated tokens after the prompt
    gives, whatever the tokens: special tokens (skipped) between words, characters split over tokens."""
    tokenizer = real_tokenizers()[kind]
    context = tokenizer(data.draw(st.text(max_size=30), label="prompt"), add_special_tokens=False).input_ids
    specials = sorted(tokenizer.all_special_ids)
    token = st.integers(0, len(tokenizer) - 1) | st.sampled_from(specials)
    ids = data.draw(st.lists(token, min_size=1, max_size=30), label="ids")
    stream = TextStream(tokenizer, [], context=context)
    streamed = "".join(stream.add(t) for t in ids) + stream.flush()
    head = tokenizer.decode(context[-4:], skip_special_tokens=True)
    whole = tokenizer.decode(context[-4:] + ids, skip_special_tokens=True)
    # bytes that never make a character: how many U+FFFD they give depends on what is decoded with them
    if "\ufffd" not in whole and whole.startswith(head):
        assert streamed == whole[len(head):]


def test_a_word_after_a_skipped_special_token_keeps_its_space_and_stop_strings_see_it():
    tokenizer = real_tokenizers()["llama-style"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ["▁sailed", "</s>", "▁across", "▁the"]]
    context = tokenizer("The ship", add_special_tokens=False).input_ids
    assert run_ids(TextStream(tokenizer, [], context=context), ids) == " sailed across the"
    stream = TextStream(tokenizer, [" across"], context=context)
    assert run_ids(stream, ids) == " sailed" and stream.stopped


def run_ids(stream: TextStream, ids: list[int]) -> str:
    return "".join(stream.add(t) for t in ids if not stream.stopped) + stream.flush()


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"model": "m", "prompt": ["a", [1, 2]]}, "prompt"),  # strings and token lists mixed
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": [[1, -2]]}, "prompt"),
    ({"model": "m", "prompt": ["x"] * 300}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "x", "seed": True}, "seed"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "x", "echo": "yes"}, "echo"),
    ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "m", "prompt": "x", "logprobs": -1}, "logprobs"),
    ({"model": "m", "prompt": "x", "logprobs": True}, "logprobs"),
    ({"model": "m", "prompt": "x", "logprobs": 2.5}, "logprobs"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "n": 129}, "n"),
    ({"model": "m", "prompt": "x", "n": "2"}, "n"),
    ({"model": "m", "prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"model": "m", "prompt": "x", "best_of": 21}, "best_of"),
    ({"model": "m", "prompt": "x", "best_of": 3, "stream": True}, "best_of"),
    ({"model": "m", "prompt": ["x"] * 20, "best_of": 20}, "prompt"),  # 400 rows
    ({"model": "m", "prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"model": "m", "prompt": "x", "frequency_penalty": "high"}, "frequency_penalty"),
    ({"model": "m", "prompt": "x", "logit_bias": [1]}, "logit_bias"),
    ({"model": "m", "prompt": "x", "logit_bias": {"-1": 1}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "logit_bias": {"the": 1}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "logit_bias": {"99999999999999": 1}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"model": "m", "prompt": "x", "logit_bias": {"5": None}}, "logit_bias.5"),
    ({"model": "m", "prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "suffix": "end"}, "suffix"),
    ({"model": "m", "prompt": "x", "adapters": ["a"]}, "adapters"),
    ({"model": "m", "prompt": "x", "adapters": {"a": 99}}, "adapters.a"),
])
def test_bad_completion_fields_name_the_field(body, param):
    with pytest.raises(ApiError) as err:
        parse_request(body, chat=False)
    assert err.value.status == 400 and err.value.param == param


@pytest.mark.parametrize("body, param", [
    ({"logprobs": 3}, "logprobs"),  # a boolean in chat
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"echo": True}, "echo"),  # completions only
    ({"best_of": 2}, "best_of"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_bad_chat_fields_name_the_field(body, param):
    with pytest.raises(ApiError) as err:
        parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, chat=True)
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


def test_new_fields_parse_to_what_the_engine_needs():
    params = parse_request({"model": "m", "prompt": [[1, 2], [3]], "echo": True, "max_tokens": 0, "logprobs": 3,
                            "n": 2, "best_of": 4, "presence_penalty": 0.5, "frequency_penalty": -1,
                            "logit_bias": {"7": -100, "8": 3.5}, "seed": 5}, chat=False)
    assert params.prompts == [[1, 2], [3]] and params.echo and params.max_tokens == 0
    assert (params.n, params.best_of, params.logprobs) == (2, 4, 3)
    row = params.sampling(0, scored=True)
    assert (row.presence_penalty, row.frequency_penalty, row.logit_bias, row.seed) == (0.5, -1.0, {7: -100.0, 8: 3.5}, 5)
    assert params.sampling(1, scored=True).seed not in (None, 5, 6)  # other choices: derived seeds
    assert parse_request({"model": "m", "prompt": "x", "best_of": 3}, chat=False).sampling(0, scored=True).logprobs == 0
    chat = parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                          "top_logprobs": 4, "n": 3}, chat=True)
    assert (chat.logprobs, chat.n) == (4, 3)
    assert parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
                         chat=True).logprobs == 0
    assert parse_request({"model": "m", "prompt": "x", "logprobs": False}, chat=False).logprobs is None


# -- property tests over the generation fields ------------------------------------------------------


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)
FIELDS = ["logprobs", "top_logprobs", "echo", "n", "best_of", "presence_penalty", "frequency_penalty", "logit_bias",
          "seed", "max_tokens", "temperature", "top_p", "stream", "prompt"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5), st.booleans())
def test_any_values_of_the_fields_give_params_or_a_400_naming_one(fields, chat):
    body = {"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "x"}], **fields}
    try:
        params = parse_request(body, chat=chat)
    except ApiError as err:
        assert err.status == 400 and err.param and err.message
        return
    assert 1 <= params.n <= params.best_of <= 128 and params.logprobs in (None, *range(21))
    assert -2 <= params.presence_penalty <= 2 and -2 <= params.frequency_penalty <= 2
    assert all(isinstance(k, int) and k >= 0 and -100 <= v <= 100 for k, v in params.logit_bias.items())
    assert params.max_tokens is None or params.max_tokens >= (0 if params.echo else 1)


@settings(max_examples=200, deadline=None)
@given(presence=st.floats(-2, 2), frequency=st.floats(-2, 2), n=st.integers(1, 8), logprobs=st.integers(0, 20),
       bias=st.dictionaries(st.integers(0, 10**6).map(str), st.floats(-100, 100), max_size=4))
def test_valid_values_are_kept_exactly(presence, frequency, n, logprobs, bias):
    params = parse_request({"model": "m", "prompt": "x", "presence_penalty": presence, "frequency_penalty": frequency,
                            "n": n, "logprobs": logprobs, "logit_bias": bias}, chat=False)
    row = params.sampling(0, scored=False)
    assert (row.presence_penalty, row.frequency_penalty, row.logprobs, params.n) == (presence, frequency, logprobs, n)
    assert row.logit_bias == {int(k): v for k, v in bias.items()}
