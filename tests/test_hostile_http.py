"""Hostile HTTP clients against `lorakit serve`: every malformed request gets a 4xx in OpenAI's error shape,
and it hurts nobody else: a well-formed request sent at the same moment gets its exact greedy answer,
/health stays up, and nothing appears in the adapter directory.

One server on a tiny base serves the whole table; each case runs its hostile request and a good one
concurrently.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

import lorakit
from lorakit.base import load_base
from lorakit.generate import Sampling, stream_tokens
from lorakit.serve.app import ServeConfig
from tests.conftest import randomize_adapters
from tests.hostile import assert_unchanged, snapshot
from tests.serving import live_server
from tests.test_hostile_adapters import CASES as ADAPTER_CASES, spoil

KEY = "hostile-key"
GOOD_PROMPT = "The ship sailed"
GOOD_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model, _ = load_base(tiny_base, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, scale=0.3)
    lorakit.save_adapter(model, root / "good")
    return root


@pytest.fixture(scope="module")
def server(tiny_base, adapter_dir):
    config = ServeConfig(base=str(tiny_base), adapters={"legal": str(adapter_dir / "good")}, adapter_dir=adapter_dir,
                         api_key=KEY, max_tokens=32, max_body_bytes=1 << 16, max_batch=8, dtype="fp32",
                         max_adapters=4)
    with live_server(config) as (url, engine, registry):
        yield url, engine, registry


@pytest.fixture(scope="module")
def expected(tiny_base, adapter_dir):
    """The good request's greedy text by the plain one-sequence path, not by the server."""
    model, tokenizer = load_base(tiny_base, dtype=torch.float32)
    lorakit.load_adapter(model, adapter_dir / "good", adapter="legal")
    ids = tokenizer(GOOD_PROMPT).input_ids
    tokens = stream_tokens(model, ids, Sampling(max_new_tokens=GOOD_TOKENS, greedy=True), tokenizer.eos_token_id)
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def send(url: str, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None,
         key: str | None = KEY) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if raw is not None:
        headers.setdefault("Content-Type", "application/json")
        return httpx.request(method, url + path, content=raw, headers=headers, timeout=60)
    return httpx.request(method, url + path, json=body, headers=headers, timeout=60)


def good_request(url: str) -> str:
    r = send(url, "POST", "/v1/completions", {"model": "legal", "prompt": GOOD_PROMPT, "max_tokens": GOOD_TOKENS,
                                              "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@dataclass
class Case:
    id: str
    body: object = None
    raw: bytes | None = None
    path: str = "/v1/completions"
    method: str = "POST"
    status: int = 400
    param: str | None = None
    headers: dict | None = None
    key: str | None = KEY


def c(id: str, body: dict, status: int = 400, param: str | None = None, path: str = "/v1/completions") -> Case:
    return Case(id, body=body, status=status, param=param, path=path)


def ok(**fields) -> dict:
    return {"model": "legal", "prompt": "Hello", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"model": "legal", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


CHAT = "/v1/chat/completions"
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"

CASES = [
    # the body itself
    Case("body-not-json", raw=b"{nope"),
    Case("body-empty", raw=b""),
    Case("body-json-list", raw=b"[1, 2]"),
    Case("body-json-string", raw=b'"hi"'),
    Case("body-json-null", raw=b"null"),
    Case("body-5000-digit-number", raw=b'{"model": "legal", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
    Case("body-deep-nesting", raw=b'{"model": "legal", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
    Case("body-lone-surrogate", raw=b'{"model": "legal", "prompt": "\\ud800"}'),
    Case("body-not-utf8", raw=b'{"model": "legal", "prompt": "\xff\xfe"}'),
    Case("body-too-big", raw=b'{"model": "legal", "prompt": "' + b"a" * (1 << 17) + b'"}', status=413),
    Case("body-wrong-content-type", raw=b"{}", headers={"Content-Type": "text/plain"}, status=415),
    Case("no-api-key", body=ok(), key=None, status=401),
    Case("wrong-api-key", body=ok(), key="guess", status=401),
    Case("get-on-post-route", method="GET", path="/v1/completions", status=405),
    Case("unknown-route", method="GET", path="/v1/nothing", status=404),
    # completions fields
    c("model-missing", {"prompt": "x"}, param="model"),
    c("model-number", ok(model=5), param="model"),
    c("model-unknown", ok(model="nobody"), status=404, param="model"),
    c("model-empty", ok(model=""), param="model"),
    c("prompt-number", ok(prompt=5), param="prompt"),
    c("prompt-dict", ok(prompt={"a": 1}), param="prompt"),
    c("prompt-null", ok(prompt=None), param="prompt"),
    c("prompt-empty-string", ok(prompt=""), param="prompt"),
    c("prompt-empty-list", ok(prompt=[]), param="prompt"),
    c("prompt-mixed-list", ok(prompt=["a", 5]), param="prompt"),
    c("prompt-list-of-empty-lists", ok(prompt=[[]]), param="prompt"),
    c("prompt-ids-out-of-vocab", ok(prompt=[1, 10**6]), param="prompt"),
    c("prompt-ids-negative", ok(prompt=[1, -1]), param="prompt"),
    c("prompt-ids-huge", ok(prompt=[2**70]), param="prompt"),
    c("prompt-ids-bools", ok(prompt=[True, False]), param="prompt"),
    c("prompt-ids-floats", ok(prompt=[1.5]), param="prompt"),
    c("prompt-over-context", ok(prompt="word " * 400, max_tokens=None), param="prompt"),
    c("max-tokens-zero", ok(max_tokens=0), param="max_tokens"),
    c("max-tokens-negative", ok(max_tokens=-1), param="max_tokens"),
    c("max-tokens-string", ok(max_tokens="4"), param="max_tokens"),
    c("max-tokens-float", ok(max_tokens=1.5), param="max_tokens"),
    c("max-tokens-huge", ok(max_tokens=10**30), param="max_tokens"),
    c("max-tokens-over-cap", ok(max_tokens=1000), param="max_tokens"),
    c("temperature-negative", ok(temperature=-1), param="temperature"),
    c("temperature-too-hot", ok(temperature=3), param="temperature"),
    c("temperature-string", ok(temperature="hot"), param="temperature"),
    c("temperature-bool", ok(temperature=True), param="temperature"),
    Case("temperature-nan", raw=b'{"model": "legal", "prompt": "x", "temperature": NaN}'),
    Case("temperature-infinity", raw=b'{"model": "legal", "prompt": "x", "temperature": Infinity}'),
    c("top-p-zero", ok(top_p=0), param="top_p"),
    c("top-p-negative", ok(top_p=-0.5), param="top_p"),
    c("top-p-over-one", ok(top_p=1.5), param="top_p"),
    c("top-p-list", ok(top_p=[0.5]), param="top_p"),
    c("top-k-below-minus-one", ok(top_k=-2), param="top_k"),
    c("top-k-float", ok(top_k=1.5), param="top_k"),
    c("top-k-huge", ok(top_k=10**40), param="top_k"),
    c("seed-string", ok(seed="x"), param="seed"),
    c("seed-float", ok(seed=1.5), param="seed"),
    c("seed-huge", ok(seed=2**70), param="seed"),
    c("stop-five", ok(stop=["a", "b", "c", "d", "e"]), param="stop"),
    c("stop-empty-string", ok(stop=""), param="stop"),
    c("stop-number", ok(stop=[1]), param="stop"),
    c("stream-string", ok(stream="yes"), param="stream"),
    c("stream-options-list", ok(stream_options=[1]), param="stream_options"),
    c("adapters-list", ok(adapters=["legal"]), param="adapters"),
    c("adapters-scale-string", ok(adapters={"legal": "a"}), param="adapters.legal"),
    c("adapters-scale-huge", ok(adapters={"legal": 1e9}), param="adapters.legal"),
    c("adapters-unknown", ok(adapters={"nobody": 1.0}), status=404, param="adapters"),
    Case("adapters-scale-nan", raw=b'{"model": "legal", "prompt": "x", "adapters": {"legal": NaN}}'),
    c("tools-given", ok(tools=[{"type": "function"}]), param="tools"),
    c("echo-string", ok(echo="yes"), param="echo"),
    c("suffix-given", ok(suffix="end"), param="suffix"),
    c("n-zero", ok(n=0), param="n"),
    c("n-huge", ok(n=10**6), param="n"),
    c("best-of-below-n", ok(n=3, best_of=2), param="best_of"),
    c("logprobs-too-many", ok(logprobs=1000), param="logprobs"),
    c("logprobs-negative", ok(logprobs=-1), param="logprobs"),
    c("logit-bias-list", ok(logit_bias=[1]), param="logit_bias"),
    c("logit-bias-word-key", ok(logit_bias={"the": 5}), param="logit_bias"),
    c("logit-bias-out-of-vocab", ok(logit_bias={"1000000": 5}), param="logit_bias"),
    c("logit-bias-huge", ok(logit_bias={"5": 1e9}), param="logit_bias.5"),
    Case("logit-bias-nan", raw=b'{"model": "legal", "prompt": "x", "logit_bias": {"5": NaN}}'),
    c("presence-penalty-huge", ok(presence_penalty=3), param="presence_penalty"),
    c("frequency-penalty-string", ok(frequency_penalty="x"), param="frequency_penalty"),
    # chat
    c("chat-messages-missing", {"model": "legal"}, param="messages", path=CHAT),
    c("chat-messages-empty", chat(messages=[]), param="messages", path=CHAT),
    c("chat-messages-string", chat(messages="hi"), param="messages", path=CHAT),
    c("chat-role-unknown", chat(messages=[{"role": "wizard", "content": "x"}]), param="messages", path=CHAT),
    c("chat-content-number", chat(messages=[{"role": "user", "content": 5}]), param="messages", path=CHAT),
    c("chat-content-image", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), param="messages",
      path=CHAT),
    c("chat-message-not-object", chat(messages=["hi"]), param="messages", path=CHAT),
    c("chat-max-completion-tokens-zero", chat(max_completion_tokens=0), param="max_tokens", path=CHAT),
    # loading and unloading adapters
    c("load-name-missing", {"lora_path": "good"}, param="lora_name", path=LOAD),
    c("load-name-number", {"lora_name": 5, "lora_path": "good"}, param="lora_name", path=LOAD),
    c("load-name-space", {"lora_name": "a b", "lora_path": "good"}, param="lora_name", path=LOAD),
    c("load-name-too-long", {"lora_name": "a" * 65, "lora_path": "good"}, param="lora_name", path=LOAD),
    c("load-name-slash", {"lora_name": "../x", "lora_path": "good"}, param="lora_name", path=LOAD),
    c("load-name-is-base", {"lora_name": "lorakit/embedded", "lora_path": "good"}, param="lora_name", path=LOAD),
    c("load-name-taken", {"lora_name": "legal", "lora_path": "good"}, param="lora_name", path=LOAD),
    c("load-path-missing", {"lora_name": "x1"}, param="lora_path", path=LOAD),
    c("load-path-number", {"lora_name": "x1", "lora_path": 3}, param="lora_path", path=LOAD),
    c("load-path-absolute-outside", {"lora_name": "x1", "lora_path": "/etc"}, status=403, param="lora_path", path=LOAD),
    c("load-path-dotdot", {"lora_name": "x1", "lora_path": "../.."}, status=403, param="lora_path", path=LOAD),
    c("load-path-nul", {"lora_name": "x1", "lora_path": "go\u0000od"}, param="lora_path", path=LOAD),
    c("load-path-nonexistent", {"lora_name": "x1", "lora_path": "nothing"}, param="lora_path", path=LOAD),
    c("load-path-symlink-loop", {"lora_name": "x1", "lora_path": "loop"}, param="lora_path", path=LOAD),
    c("load-path-root-itself", {"lora_name": "x1", "lora_path": "."}, param="lora_path", path=LOAD),
    c("unload-unknown", {"lora_name": "nobody"}, status=404, param="lora_name", path=UNLOAD),
    c("unload-number", {"lora_name": 5}, status=404, param="lora_name", path=UNLOAD),
    c("unload-base", {"lora_name": "lorakit/embedded"}, status=404, param="lora_name", path=UNLOAD),
    # sampling values that pass the range checks but underflow float32: must not NaN, for this row or others
    c("temperature-1e-45", ok(temperature=1e-45, max_tokens=4), status=200),
    c("temperature-5e-324", ok(temperature=5e-324, max_tokens=4), status=200),
    c("top-p-1e-300", ok(top_p=1e-300, max_tokens=4, temperature=1.0), status=200),
    c("top-p-and-temperature-tiny", ok(top_p=1e-300, temperature=1e-45, max_tokens=4), status=200),
    c("top-k-one-temperature-tiny", ok(top_k=1, temperature=1e-30, max_tokens=4), status=200),
    c("adapter-scale-minus-eight", ok(adapters={"legal": -8.0}, max_tokens=4, temperature=0.7), status=200),
]

# adapter directories an HTTP client may point a load at: the file cases of test_hostile_adapters
LOAD_FILE_CASES = [a for a in ADAPTER_CASES if "python" in a.where and a.id != "directory-symlink-loop"]


def check_error_shape(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error


def run_beside_good(server, expected, hostile) -> httpx.Response:
    """Send the hostile request and a well-formed one at the same moment; the good one must be answered exactly."""
    url = server[0]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bad = pool.submit(hostile)
        goods = [pool.submit(good_request, url) for _ in range(2)]
        response = bad.result()
        assert [g.result() for g in goods] == [expected, expected]
    health = httpx.get(url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert server[1].last_error is None, server[1].last_error
    return response


@pytest.fixture
def loop_link(adapter_dir):
    link = adapter_dir / "loop"
    if not link.is_symlink():
        os.symlink(link, link)
    yield
    link.unlink()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_request_gets_a_4xx_and_hurts_nobody(case, server, expected, adapter_dir, loop_link):
    url = server[0]
    before = snapshot(adapter_dir)
    models = send(url, "GET", "/v1/models").json()

    def hostile():
        return send(url, case.method, case.path, body=case.body, raw=case.raw, headers=case.headers, key=case.key)

    r = run_beside_good(server, expected, hostile)
    if case.status == 200:
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        assert isinstance(text, str)
    else:
        check_error_shape(r, case.status, case.param)
    assert send(url, "GET", "/v1/models").json()["data"] == models["data"]  # no adapter appeared or vanished
    assert_unchanged(before, snapshot(adapter_dir))


@pytest.mark.parametrize("case", LOAD_FILE_CASES, ids=lambda c: c.id)
def test_loading_a_hostile_adapter_directory_is_a_400(case, server, expected, adapter_dir, tiny_base):
    from tests.test_hostile_adapters import spoil

    url = server[0]
    name = "bad-" + case.id[:40]
    where = adapter_dir / name
    shutil.rmtree(where, ignore_errors=True)
    spoil(adapter_dir / "good", where, case)
    try:
        before = snapshot(adapter_dir)
        r = run_beside_good(server, expected, lambda: send(url, "POST", LOAD, {"lora_name": "x2", "lora_path": name}))
        check_error_shape(r, 400, "lora_path")
        assert str(adapter_dir) not in r.json()["error"]["message"]  # the server's own paths stay private
        assert "x2" not in {m["id"] for m in send(url, "GET", "/v1/models").json()["data"]}
        assert_unchanged(before, snapshot(adapter_dir))
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_row_whose_sampling_fails_ends_alone_with_a_logged_500(server, expected, capfd, monkeypatch):
    """A failure in one request's sampling answers that request 500 (OpenAI's shape) and writes the traceback
    to the server's log; the requests decoded in the same batch carry on and get their exact answers."""
    from lorakit.serve.sampling import RowSampler

    original = RowSampler.sample
    calls = []

    def failing(self, z):
        if self.params.top_k == 7:  # only the marked request, at its second token (a decode step, not the prefill)
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected sampling failure")
        return original(self, z)

    monkeypatch.setattr(RowSampler, "sample", failing)
    url = server[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(good_request, url) for _ in range(3)]
        bad = pool.submit(send, url, "POST", "/v1/completions", ok(top_k=7, temperature=0.8, max_tokens=4))
        assert [g.result() for g in goods] == [expected] * 3
        r = bad.result()
    check_error_shape(r, 500, None)
    assert r.json()["error"]["type"] == "server_error"
    log = capfd.readouterr().err
    assert "Traceback" in log and "injected sampling failure" in log
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    server[1].last_error = None


@pytest.mark.parametrize("body, chat, inline", [
    ({"prompt": "The ship"}, False, True),
    ({"prompt": "x" * 2000}, False, False),
    ({"prompt": ["ab"] * 20}, False, False),  # many short prompts: each is a call
    ({"prompt": [[1, 2, 3]] * 20}, False, False),
    ({"messages": [{"role": "user", "content": "hi"}]}, True, True),
    ({"messages": [{"role": "user", "content": ""}] * 100}, True, False),  # a template writes around each one
])
def test_only_small_prompts_are_tokenized_on_the_event_loop(body, chat, inline):
    from lorakit.serve import api
    from lorakit.serve.protocol import parse_request

    params = parse_request({"model": "m", **body}, chat)
    assert (api._text_size(params) <= api.INLINE_TOKENIZE_CHARS) == inline


def test_tokenizing_a_prompt_does_not_hold_up_the_event_loop(server, monkeypatch):
    """While a long prompt is being tokenized, /health still answers at once: tokenizing runs off the event loop
    (every prompt counts as long here; short ones are tokenized on the loop, quicker than handing them over)."""
    import threading

    from lorakit.serve import api
    from lorakit.serve.api import Api

    monkeypatch.setattr(api, "INLINE_TOKENIZE_CHARS", -1)

    entered, release = threading.Event(), threading.Event()
    original = Api.prompt_ids

    def slow(self, params, chat):
        entered.set()
        release.wait(30)  # a huge prompt being tokenized
        return original(self, params, chat)

    monkeypatch.setattr(Api, "prompt_ids", slow)
    url = server[0]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(send, url, "POST", "/v1/completions", ok())
        assert entered.wait(30)
        try:
            assert httpx.get(url + "/health", timeout=5).status_code == 200
        finally:
            release.set()
        assert pending.result().status_code == 200


def test_loading_beyond_max_adapters_is_refused_until_one_is_unloaded(server, adapter_dir):
    url = server[0]
    loaded = []
    try:
        for i in range(3):  # "legal" is one; the cap is 4
            name = f"extra.v{i}"  # dots in names simply work
            r = send(url, "POST", LOAD, {"lora_name": name, "lora_path": "good"})
            assert r.status_code == 200, r.text
            loaded.append(name)
        r = send(url, "POST", LOAD, {"lora_name": "one-too-many", "lora_path": "good"})
        check_error_shape(r, 400, "lora_name")
        assert "--max-adapters" in r.json()["error"]["message"]
        r = send(url, "POST", "/v1/completions", {"model": "extra.v0", "prompt": GOOD_PROMPT, "max_tokens": 4,
                                                  "temperature": 0})
        assert r.status_code == 200, r.text
        assert send(url, "POST", UNLOAD, {"lora_name": loaded.pop()}).status_code == 200
        r = send(url, "POST", LOAD, {"lora_name": "one-too-many", "lora_path": "good"})
        assert r.status_code == 200, r.text
        loaded.append("one-too-many")
    finally:
        for name in loaded:
            send(url, "POST", UNLOAD, {"lora_name": name})


def test_a_file_swapped_for_a_link_after_the_path_check_is_refused(server, adapter_dir, tmp_path, monkeypatch):
    """The confinement to --adapter-dir holds for the file actually opened: a symlink to a file outside put in
    place between the path check and the threaded read is caught at the open (403), not followed."""
    from lorakit.serve.api import Api

    outside = tmp_path / "outside"
    shutil.copytree(adapter_dir / "good", outside)
    inside = adapter_dir / "swapped"
    shutil.copytree(adapter_dir / "good", inside)
    original = Api.adapter_path

    def check_then_swap(self, path):
        checked = original(self, path)  # the check passes on the real directory ...
        weights = inside / "adapter_model.safetensors"
        weights.unlink()  # ... and then the file becomes a link to one outside
        weights.symlink_to(outside / "adapter_model.safetensors")
        return checked

    monkeypatch.setattr(Api, "adapter_path", check_then_swap)
    try:
        r = send(server[0], "POST", LOAD, {"lora_name": "swapped", "lora_path": "swapped"})
        check_error_shape(r, 403, "lora_path")
    finally:
        shutil.rmtree(inside)
