"""OpenAI's generation fields over HTTP: logprobs (both shapes), echo, scoring with max_tokens 0, n,
several prompts, best_of, presence/frequency penalties, seed, logit_bias, stop and usage, streamed
and not; hostile values of each; and served log-probabilities against PEFT's model (fp32)."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading

import httpx
import openai
import pytest
import torch

from lorakit.base import load_base
from lorakit.serve.config import ServeConfig
from tests.serving import live_server, make_adapters

BASE = "lorakit/embedded"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return make_adapters(root, {"legal": 8, "poetry": 4})


@pytest.fixture(scope="module")
def server(adapters):
    config = ServeConfig(adapters={k: str(v) for k, v in adapters.items()}, dtype="fp32", max_tokens=64,
                         max_batch=8, max_waiting=40)
    with live_server(config) as (url, engine, _):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def peft_models(adapters):
    """The oracle: transformers' model with each adapter loaded by PEFT (not by lorakit), fp32."""
    from peft import PeftModel

    models = {}
    for name, path in adapters.items():
        base, tokenizer = load_base(None, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, str(path)).eval()
    models[BASE] = load_base(None, dtype=torch.float32)[0].eval()
    models["tokenizer"] = tokenizer
    return models


def post(server, path, body):
    # json.dumps writes Infinity / NaN, which Python's JSON reader (and so the server's) accepts
    return httpx.post(server[0] + path, content=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=60)


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)  # (L, V)


def test_echo_and_generated_logprobs_equal_peft_alone_and_in_a_mixed_batch(client, server, peft_models):
    tokenizer = peft_models["tokenizer"]
    cases = [("legal", "The ship sailed"), ("poetry", "In the beginning"), (BASE, "Water is"), ("legal", "A king")]

    def ask(case):
        model, prompt = case
        return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=5,
                                         echo=True, extra_body={"return_tokens_as_token_ids": True}).choices[0]

    alone = [ask(c) for c in cases]
    before = server[1].stats.max_batch_seen
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(ask, cases * 2))
    assert server[1].stats.max_batch_seen > max(1, before - 1)
    for (model, prompt), choice in zip(cases * 3, alone + together):
        ids = tokenizer(prompt).input_ids
        lp = choice.logprobs
        assert choice.text.startswith(prompt)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        sequence = [int(t.removeprefix("token_id:")) for t in lp.tokens]
        assert sequence[:len(ids)] == ids and len(sequence) == len(ids) + 8
        reference = log_softmax(peft_models[model], sequence)
        assert len(lp.tokens) == len(sequence) == len(lp.token_logprobs)
        for t in range(1, len(sequence)):
            assert lp.token_logprobs[t] == pytest.approx(reference[t - 1, sequence[t]].item(), abs=1e-4), (model, t)
            best = reference[t - 1].topk(5)
            top = lp.top_logprobs[t]
            assert len(top) in (5, 6)  # the 5 likeliest, and the chosen token if it is not among them
            assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
            assert f"token_id:{best.indices[0].item()}" in top


def test_scoring_only_with_max_tokens_zero(client, peft_models):
    tokenizer = peft_models["tokenizer"]
    r = client.completions.create(model="poetry", prompt="The sea was calm", max_tokens=0, echo=True, logprobs=0)
    choice = r.choices[0]
    ids = tokenizer("The sea was calm").input_ids
    assert choice.text == "The sea was calm" and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    reference = log_softmax(peft_models["poetry"], ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [reference[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4)
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])  # logprobs 0: just the token itself
    # token ids in, several prompts at once (lm-evaluation-harness's request), choices in prompt order
    r = client.completions.create(model="poetry", prompt=[ids, ids[:3]], max_tokens=0, echo=True, logprobs=1)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(choice.logprobs.token_logprobs[:len(ids)], abs=1e-5)
    assert len(r.choices[1].logprobs.tokens) == 3
    assert r.usage.prompt_tokens == len(ids) + 3


def test_text_offsets_point_into_the_returned_text(client):
    r = client.completions.create(model="legal", prompt="Once upon a time", max_tokens=20, temperature=0, logprobs=2,
                                  echo=True)
    choice = r.choices[0]
    offsets, tokens = choice.logprobs.text_offset, choice.logprobs.tokens
    assert offsets == sorted(offsets)
    for offset, token in zip(offsets[1:], tokens[1:]):  # after <s>
        if not token.startswith("bytes:"):
            assert choice.text[offset:].startswith(token)
    plain = client.completions.create(model="legal", prompt="Once upon a time", max_tokens=20, temperature=0,
                                      logprobs=2).choices[0]
    assert choice.text == "Once upon a time" + plain.text
    assert plain.logprobs.text_offset[0] == 0 and plain.logprobs.tokens == tokens[len(tokens) - len(plain.logprobs.tokens):]


def test_streamed_logprobs_equal_the_whole_answer(client):
    kwargs = dict(model="legal", prompt="The king said", max_tokens=24, temperature=0, logprobs=3)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)


def test_chat_logprobs_shape_streamed_and_not(client, peft_models):
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    r = client.chat.completions.create(model="poetry", messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content).startswith(
        r.choices[0].message.content[:5])
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy: the likeliest
    stream = client.chat.completions.create(model="poetry", messages=messages, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in entries] == [(e.token, round(e.logprob, 5)) for e in content]
    plain = client.chat.completions.create(model="poetry", messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    only = client.chat.completions.create(model="poetry", messages=messages, max_tokens=4, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in only.choices[0].logprobs.content)


def test_n_choices_and_seeds(client, server):
    kwargs = dict(model="legal", prompt="The ship", max_tokens=16, temperature=1.0, seed=123)
    r = client.completions.create(n=4, **kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1  # derived seeds: different samples
    single = client.completions.create(**kwargs)
    assert single.choices[0].text == texts[0]  # choice 0 uses the seed itself
    assert [c.text for c in client.completions.create(n=4, **kwargs).choices] == texts  # same seed, same samples
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens > single.usage.completion_tokens
    # the same seeded request among others (a mixed batch): the same sample
    others = [dict(model=m, prompt=p, max_tokens=16, temperature=0.9) for m in ("poetry", BASE) for p in ("A", "B")]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client.completions.create, n=4, **kwargs)] + \
                  [pool.submit(client.completions.create, **o) for o in others]
        assert [c.text for c in futures[0].result().choices] == texts
    chat = client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "hi"}], n=3,
                                          max_tokens=8, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    greedy = client.completions.create(model="legal", prompt=["A", "B"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1, 2, 3]
    assert greedy.choices[0].text == greedy.choices[1].text != greedy.choices[2].text == greedy.choices[3].text


def test_streamed_n_choices_carry_their_index(client):
    kwargs = dict(model="legal", prompt="The ship", max_tokens=10, temperature=1.0, seed=9, n=3)
    whole = [c.text for c in client.completions.create(**kwargs).choices]
    texts = collections.defaultdict(str)
    finishes = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [texts[i] for i in range(3)] == whole and set(finishes) == {0, 1, 2}


def test_best_of_returns_the_likeliest_per_token(client):
    kwargs = dict(model="poetry", prompt="The sea", max_tokens=10, temperature=1.2, seed=77)
    every = client.completions.create(n=5, best_of=5, logprobs=0, **kwargs).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every]
    best = client.completions.create(n=2, best_of=5, **kwargs)
    ranked = sorted(range(5), key=lambda i: -means[i])[:2]
    assert [c.text for c in best.choices] == [every[i].text for i in ranked]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in every)  # every candidate is paid for


def direct_greedy(model, ids: list[int], steps: int, presence: float, frequency: float, bias: dict[int, float]):
    """Greedy decoding with OpenAI's formula written out, one full forward per token (no cache)."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            z = model(torch.tensor([ids + out])).logits[0, -1].double()
        counts = collections.Counter(out)
        adjusted = [mu - counts[j] * frequency - float(counts[j] > 0) * presence + bias.get(j, 0.0)
                    for j, mu in enumerate(z.tolist())]
        out.append(max(range(len(adjusted)), key=adjusted.__getitem__))
    return out


@pytest.mark.parametrize("presence, frequency, bias", [(0.0, 1.5, {}), (2.0, 0.0, {}), (0.6, 0.6, {}),
                                                        (0.0, 0.0, {"200": 8.0, "389": -100})])
def test_penalties_and_bias_follow_openais_formula(client, peft_models, presence, frequency, bias):
    tokenizer = peft_models["tokenizer"]
    ids = tokenizer("The ship").input_ids
    r = client.completions.create(model="legal", prompt=ids, max_tokens=32, temperature=0, presence_penalty=presence,
                                  frequency_penalty=frequency, logit_bias=bias, logprobs=0)
    expected = direct_greedy(peft_models["legal"], ids, 32, presence, frequency, {int(k): v for k, v in bias.items()})
    assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    plain = client.completions.create(model="legal", prompt=ids, max_tokens=32, temperature=0).choices[0].text
    assert r.choices[0].text != plain  # the settings really changed the answer


def test_logit_bias_forces_and_bans_tokens(client, peft_models):
    tokenizer = peft_models["tokenizer"]
    word = tokenizer(" sea", add_special_tokens=False).input_ids[0]
    r = client.completions.create(model=BASE, prompt="The", max_tokens=5, temperature=0.8, seed=1,
                                  logit_bias={str(word): 100})
    assert r.choices[0].text == tokenizer.decode([word]) * 5
    first = client.completions.create(model=BASE, prompt="The", max_tokens=1, temperature=0, logprobs=0,
                                      extra_body={"return_tokens_as_token_ids": True})
    banned = int(first.choices[0].logprobs.tokens[0].removeprefix("token_id:"))
    r = client.completions.create(model=BASE, prompt="The", max_tokens=1, temperature=0,
                                  logit_bias={str(banned): -100})
    plain = client.completions.create(model=BASE, prompt="The", max_tokens=1, temperature=0).choices[0].text
    assert r.choices[0].text != plain


def test_stop_cuts_text_and_logprobs_together(client):
    full = client.completions.create(model="poetry", prompt="The sea", max_tokens=40, temperature=0, logprobs=1).choices[0]
    stop = full.text[12:15]
    cut = client.completions.create(model="poetry", prompt="The sea", max_tokens=40, temperature=0, logprobs=1,
                                    stop=[stop]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    kept = [o for o in full.logprobs.text_offset if o < len(cut.text)]
    assert cut.logprobs.text_offset == kept and cut.logprobs.tokens == full.logprobs.tokens[:len(kept)]


@pytest.mark.parametrize("body, param", [
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": "5"}, "logprobs"),
    ({"echo": 1}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 without echo
    ({"max_tokens": -1, "echo": True}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"n": 41}, "n"),  # over this server's --max-waiting (40)
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"logit_bias": {"8192": 1}}, "logit_bias"),  # outside the vocabulary
    ({"logit_bias": {"1": "up"}}, "logit_bias.1"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"seed": "abc"}, "seed"),
    ({"prompt": [[1, 2], [8192]]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
])
def test_hostile_values_of_new_fields_get_a_400_naming_them_and_hurt_nobody(server, client, body, param):
    done = threading.Event()
    other = {}

    def bystander():
        other["text"] = client.completions.create(model="legal", prompt="The ship", max_tokens=12,
                                                  temperature=0).choices[0].text
        done.set()

    thread = threading.Thread(target=bystander)
    thread.start()
    r = post(server, "/v1/completions", {"model": "legal", "prompt": "x", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    thread.join(60)
    assert done.is_set()
    assert other["text"] == client.completions.create(model="legal", prompt="The ship", max_tokens=12,
                                                      temperature=0).choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"),
    ({"n": 200}, "n"), ({"presence_penalty": 3}, "presence_penalty"),
])
def test_hostile_chat_fields(server, body, param):
    r = post(server, "/v1/chat/completions", {"model": "legal", "messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
