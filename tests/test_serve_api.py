"""`lorakit serve` over HTTP with the official `openai` client: completions, chat, streaming, errors,
auth, limits, adapter loading confined to --adapter-dir, hot-swap under load."""

from __future__ import annotations

import concurrent.futures
import os

import httpx
import openai
import pytest
import torch

import lorakit
from lorakit.base import load_base
from lorakit.generate import Sampling, stream_tokens
from lorakit.serve.config import ServeConfig
from tests.serving import live_server, make_adapters

KEY = "test-key-123"
BASE = "lorakit/embedded"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return root, make_adapters(root, {"legal": 8, "poetry": 16, "tech": 4})


@pytest.fixture(scope="module")
def server(adapters):
    root, paths = adapters
    config = ServeConfig(adapters={"legal": str(paths["legal"]), "poetry": str(paths["poetry"])}, adapter_dir=root,
                         api_key=KEY, max_tokens=64, max_body_bytes=4096, max_batch=8)
    with live_server(config) as (url, engine, registry):
        yield url, engine, registry


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def oracle(adapters):
    """Greedy text by the plain one-sequence path (fused layers, set_adapters), not by the server."""
    _, paths = adapters
    model, tokenizer = load_base(None)
    for name, path in paths.items():
        lorakit.load_adapter(model, path, adapter=name)

    def greedy(prompt: str, mix: dict[str, float], n: int) -> str:
        ids = tokenizer(prompt).input_ids
        sampling = Sampling(max_new_tokens=n, greedy=True)
        if mix:
            lorakit.set_adapters(model, mix)
        tokens = stream_tokens(model, ids, sampling, tokenizer.eos_token_id, base=not mix)
        return tokenizer.decode(list(tokens), skip_special_tokens=True)

    greedy.tokenizer = tokenizer
    return greedy


def post(server, path, body, key=KEY, raw=None, headers=None):
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if raw is not None:
        headers.setdefault("Content-Type", "application/json")
    return httpx.post(server[0] + path, headers=headers, timeout=30,
                      **({"content": raw} if raw is not None else {"json": body}))


def test_models_lists_base_and_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) >= {BASE, "legal", "poetry"}
    assert models["legal"].parent == BASE and models["poetry"].rank == 16


@pytest.mark.parametrize("model, mix", [("poetry", {"poetry": 1.0}), ("legal", {"legal": 1.0}), (BASE, {})])
def test_completion_equals_the_plain_generation_path(client, oracle, model, mix):
    r = client.completions.create(model=model, prompt="The sea", max_tokens=24, temperature=0)
    assert r.choices[0].text == oracle("The sea", mix, 24)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(oracle.tokenizer("The sea").input_ids)
    assert r.model == model and r.object == "text_completion"


def test_adapter_mix_extension(client, oracle):
    mix = {"legal": 0.5, "poetry": 1.0}
    r = client.completions.create(model=BASE, prompt="In the beginning", max_tokens=20, temperature=0,
                                  extra_body={"adapters": mix})
    assert r.choices[0].text == oracle("In the beginning", mix, 20)


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="legal", max_tokens=30, temperature=0)
    whole = client.completions.create(prompt="Once upon", **kwargs).choices[0].text
    chunks = list(client.completions.create(prompt="Once upon", stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 30
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    chat = client.chat.completions.create(messages=messages, **kwargs)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(messages=messages, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content


def test_stop_strings_cut_the_text_in_both_modes(client):
    full = client.completions.create(model="poetry", prompt="The sea", max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]
    cut = full[:full.index(stop)]
    r = client.completions.create(model="poetry", prompt="The sea", max_tokens=40, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="poetry", prompt="The sea", max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_concurrent_requests_for_different_adapters_get_their_own_outputs(client, server):
    cases = [(m, p) for m in ("legal", "poetry", BASE) for p in ("The ship", "Water is", "A king")]
    solo = {c: client.completions.create(model=c[0], prompt=c[1], max_tokens=20, temperature=0).choices[0].text
            for c in cases}
    steps_before = server[1].stats.max_batch_seen
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        together = dict(zip(cases, pool.map(lambda c: client.completions.create(
            model=c[0], prompt=c[1], max_tokens=20, temperature=0).choices[0].text, cases)))
    assert together == solo
    assert server[1].stats.max_batch_seen > max(1, steps_before - 1)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "legal", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "legal", "prompt": "x", "n": 200}, 400, "n"),
    ({"model": "legal", "prompt": "x", "logprobs": 30}, 400, "logprobs"),
    ({"model": "legal", "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ({"model": "legal", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),  # the server's cap is 64
    ({"model": "legal", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "legal"}, 400, "prompt"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "legal", "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": BASE, "prompt": "x", "adapters": {"ghost": 1}}, 404, "adapters"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize("raw", [
    b'{"model": "legal", "prompt": "x", "seed": 1' + b"0" * 400 + b"}",  # an integer too big for any field
    b'{"model": "legal", "prompt": "\\ud800"}',  # a lone surrogate: not text
    b'{"model": "legal", "prompt": "x", "a": ' + b"[" * 1500 + b"]" * 1500 + b"}",  # nesting
    b'{"model": "legal", "prompt": "x", "repetition_penalty": 1.3}',  # vLLM extra not implemented
])
def test_hostile_bodies_get_a_400_not_a_crash(server, raw):
    r = post(server, "/v1/completions", None, raw=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_defaults_for_null_fields_and_top_k(client, oracle):
    r = client.completions.create(model="legal", prompt="The sea", max_tokens=8, temperature=0, top_p=None)
    assert r.choices[0].text == oracle("The sea", {"legal": 1.0}, 8)
    # top_k=1 samples only the likeliest token: greedy whatever the temperature
    r = client.completions.create(model="legal", prompt="The sea", max_tokens=8, temperature=1.5, seed=3,
                                  extra_body={"top_k": 1})
    assert r.choices[0].text == oracle("The sea", {"legal": 1.0}, 8)


def test_foreign_pages_cannot_post_or_rebind(server):
    # a plain HTML form or no-cors fetch can only send text/plain or form data: refused before any work
    r = post(server, "/v1/unload_lora_adapter", None, raw=b'{"lora_name": "legal"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = httpx.get(server[0] + "/v1/models", headers={"Host": "evil.example:80", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "bad_host"
    assert "legal" in {m["id"] for m in httpx.get(server[0] + "/v1/models",
                                                     headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}


def test_too_long_prompt_names_the_context_limit(server):
    r = post(server, "/v1/completions", {"model": "legal", "prompt": list(range(3, 500)), "max_tokens": 32})
    assert r.status_code == 400 and "512" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/completions", {"model": "legal", "prompt": list(range(3, 600))})
    assert r.status_code == 400 and "512" in r.json()["error"]["message"]


def test_invalid_json_and_oversized_bodies(server):
    r = post(server, "/v1/completions", None, raw=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", None, raw=b"[1, 2]")
    assert r.status_code == 400
    r = post(server, "/v1/completions", {"model": "legal", "prompt": "x" * 5000})
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]


def test_api_key_is_required_on_v1(server):
    for key in (None, "wrong"):
        r = post(server, "/v1/completions", {"model": "legal", "prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "t", "lora_path": "tech"}, key=key)
        assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server[0] + "/health").status_code == 200  # liveness needs no key
    assert "lorakit playground" in httpx.get(server[0] + "/").text


def test_load_paths_must_stay_inside_adapter_dir(server, adapters, tmp_path):
    root, paths = adapters
    outside = make_adapters(tmp_path, {"outside": 4})["outside"]
    link = root / "sneaky"
    if not link.exists():
        os.symlink(outside, link)
    for path in ("../" + outside.parent.name + "/outside", str(outside), "sneaky", "tech/../../x"):
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert r.status_code == 403, (path, r.text)
        assert str(root) not in r.text
    # an adapter directory inside whose weights file is a link to a file outside
    linked = root / "linked"
    linked.mkdir(exist_ok=True)
    (linked / "adapter_config.json").write_text((paths["tech"] / "adapter_config.json").read_text())
    if not (linked / "adapter_model.safetensors").exists():
        os.symlink(outside / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "linked"}).status_code == 403
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "te\u0000ch"})
    assert r.status_code == 400
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"})
    assert r.status_code == 400 and "not found" in r.json()["error"]["message"]
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "bad/name", "lora_path": "tech"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "legal", "lora_path": "tech"})
    assert r.status_code == 400 and "already" in r.json()["error"]["message"]
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert r.status_code == 404


def test_an_adapter_for_another_base_is_refused(server, tmp_path, adapters):
    root, _ = adapters
    wrong = root / "wrong"
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0])
    lorakit.write_adapter(wrong, config, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7),
                                          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(256, 4)})
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "wrong", "lora_path": "wrong"})
    assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
    assert "wrong" not in {m["id"] for m in httpx.get(server[0] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}


def test_adapters_that_change_shared_weights_are_refused(server, adapters):
    root, _ = adapters
    model, _ = load_base(None)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    lorakit.save_adapter(model, root / "with_head")
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "with_head", "lora_path": "with_head"})
    assert r.status_code == 400 and "modules_to_save" in r.json()["error"]["message"]
    # nothing of it stayed behind: the base still answers as the base
    assert all("with_head" not in k for k in lorakit.adapter_configs(server[1].model))


def test_load_serve_unload_while_a_request_is_in_flight(server, client, oracle):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "tech", "lora_path": "tech"})
    assert r.status_code == 200, r.text
    expected = oracle("The ship", {"tech": 1.0}, 60)
    stream = client.completions.create(model="tech", prompt="The ship", max_tokens=60, temperature=0, stream=True)
    pieces = [next(iter(stream)).choices[0].text]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "tech"}).status_code == 200
    pieces += [c.choices[0].text for c in stream]  # the request in flight finishes on its adapter
    assert "".join(pieces) == expected
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tech", prompt="x", max_tokens=2)
    # the same name loads again at once, while the old copy may still be draining
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "tech", "lora_path": "tech"}).status_code == 200
    again = client.completions.create(model="tech", prompt="The ship", max_tokens=60, temperature=0)
    assert again.choices[0].text == expected
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "tech"}).status_code == 200


def test_overload_answers_429(adapters):
    root, paths = adapters
    config = ServeConfig(adapters={"legal": str(paths["legal"])}, max_batch=1, max_waiting=1, max_tokens=64,
                         dtype="fp32")
    with live_server(config) as (url, engine, _):
        body = {"model": "legal", "prompt": "The", "max_tokens": 64, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=60).status_code,
                                     range(8)))
    assert 429 in statuses and 200 in statuses
    assert set(statuses) <= {200, 429}


def test_load_is_off_without_adapter_dir(adapters):
    _, paths = adapters
    with live_server(ServeConfig(adapters={"legal": str(paths["legal"])}, dtype="fp32")) as (url, _, _):
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "t", "lora_path": str(paths["tech"])})
        assert r.status_code == 403 and "--adapter-dir" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "legal", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200  # no --api-key: open
