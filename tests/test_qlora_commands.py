"""`--quantize nf4` on the commands that run a base with adapters (QLoRA inference): generate, eval, serve.

The oracle for every command is one model: the base loaded whole (transformers), `nf4.quantize`d, the
adapters loaded onto it, run by the plain one-sequence path. Each command streams the base in and
quantizes it on arrival, and must give that model's greedy text / perplexity / served completions exactly,
from the full-precision base directory and from the NF4 copy `lorakit quantize` wrote (taken as stored, with
or without the flag). Bad values are refused in tests/test_hostile_cli.py.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from commands import run_cli

import lorakit
from lorakit import nf4
from lorakit.base import load_base
from lorakit.evaluate import mean_nll
from lorakit.generate import Sampling, stream_text, stream_tokens
from lorakit.train import TrainConfig, train
from tests.serving import live_server

PROMPT = "the crew"
TOKENS = 24
MIX = {"crew": 1.0, "word": 0.5}  # two adapters at once: a plain LoRA and a DoRA one
# generate's text: one adapter, whose greedy text NF4 changes (under MIX both precisions loop on "ed")
ONE = {"crew": 1.0}
TEXTS = {"crew": "the crew sailed north at dawn and sang. ", "word": "in the beginning was the word. "}


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Two adapters trained on the full-precision base (as one usually is, then run over NF4)."""
    root = tmp_path_factory.mktemp("qlora-adapters")
    for name, text in TEXTS.items():
        data = root / f"{name}.txt"
        data.write_text(text * 60)
        train(TrainConfig(data=data, out=root / name, base=str(tiny_base), steps=15, batch_size=4, seq_len=32,
                          lr=1e-2, dtype="fp32", quiet=True, dora=name == "word"))
    return {name: root / name for name in TEXTS}


@pytest.fixture(scope="module")
def nf4_base(tiny_base, tmp_path_factory) -> Path:
    from lorakit.cli import main

    out = tmp_path_factory.mktemp("qlora-base") / "nf4"
    assert main(["quantize", "--base", str(tiny_base), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def oracle(tiny_base, adapters):
    """(model, tokenizer): the base loaded whole, quantized with `nf4.quantize`, the adapters loaded."""
    model, tokenizer = load_base(str(tiny_base), dtype=torch.float32, device=torch.device("cpu"))
    nf4.quantize(model)
    for name, path in adapters.items():
        lorakit.load_adapter(model, path, adapter=name)
    return model, tokenizer


def _greedy(model, tokenizer, mix: dict[str, float]) -> list[int]:
    """The plain path's greedy tokens after PROMPT under the adapter mix ({}: the base)."""
    if mix:
        lorakit.set_adapters(model, mix)
    return list(stream_tokens(model, tokenizer(PROMPT).input_ids, Sampling(max_new_tokens=TOKENS, greedy=True),
                              tokenizer.eos_token_id, base=not mix))


# -- each command: run it (the flags given) and compute what it must print from the oracle -------------


def _generate(base, adapters, flags, tmp_path, monkeypatch, capsys):
    import lorakit.generate

    specs = [f"{adapters[name]}:{w}" for name, w in ONE.items()]
    code, out, err = run_cli(monkeypatch, capsys, lorakit.generate, "generate", "--base", str(base), "--prompt",
                             PROMPT, *(a for s in specs for a in ("--adapter", s)), "--greedy", "--max-new-tokens",
                             str(TOKENS), "--dtype", "fp32", *flags)
    assert code == 0, err
    return out


def _generate_oracle(model, tokenizer, tmp_path):
    text = "".join(stream_text(tokenizer, iter(_greedy(model, tokenizer, ONE))))
    return f"{PROMPT}{text}\n\n"  # the prompt, the text, a blank line


def _data(tmp_path) -> Path:
    data = tmp_path / "held.txt"
    data.write_text(TEXTS["crew"] * 8 + TEXTS["word"] * 8)
    return data


def _eval(base, adapters, flags, tmp_path, monkeypatch, capsys):
    import lorakit.evaluate

    specs = [f"{adapters[name]}:{w}" for name, w in MIX.items()]
    code, out, err = run_cli(monkeypatch, capsys, lorakit.evaluate, "eval", "--base", str(base), "--data",
                             str(_data(tmp_path)), *(a for s in specs for a in ("--adapter", s)), "--seq-len", "32",
                             "--dtype", "fp32", "--json", *flags)
    assert code == 0, err
    result = json.loads(out)
    return result["base"]["nll"], result["adapted"]["nll"]


def _eval_oracle(model, tokenizer, tmp_path):
    from lorakit.data import load_examples

    examples = load_examples(_data(tmp_path), tokenizer, seq_len=32, labels="all")[0]
    with lorakit.disable_adapters(model):
        base, _ = mean_nll(model, examples, tokenizer.pad_token_id)
    lorakit.set_adapters(model, MIX)
    return base, mean_nll(model, examples, tokenizer.pad_token_id)[0]


# every row a request of its own, all sent at once: one mixed batch, each row routed to its own adapters
REQUESTS = [("crew", None), ("word", None), ("base", None), ("base", MIX)]


def _serve(base, adapters, flags, tmp_path, monkeypatch, capsys):
    """Served greedy tokens, every request in flight at once; `word` is loaded while the server runs. The
    command line gives the settings; the server then runs in a thread (`lorakit serve` would block)."""
    import lorakit.serve.app

    configs = []
    monkeypatch.setattr(lorakit.serve.app, "serve", configs.append)
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)  # no key: the requests below carry none
    code, _, err = run_cli(monkeypatch, capsys, lorakit.serve.app, "serve", "--base", str(base), "--adapter",
                           f"crew={adapters['crew']}", "--adapter-dir", str(adapters["word"].parent), "--dtype",
                           "fp32", "--served-model-name", "base", *flags)
    assert code == 0, err
    with live_server(configs[0]) as (url, engine, _):
        load = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "word", "lora_path": "word"}, timeout=30)
        assert load.status_code == 200, load.text

        def complete(request):
            model, mix = request
            # the token ids (vLLM's names for them), not the text: the text holds back a trailing half character
            body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "logprobs": 0,
                    "return_tokens_as_token_ids": True, **({"adapters": mix} if mix else {})}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]

        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            tokens = list(pool.map(complete, REQUESTS))
        assert engine.stats.max_batch_seen > 1  # they did share a batch
    return tokens


def _serve_oracle(model, tokenizer, tmp_path):
    mixes = [mix or ({} if name == "base" else {name: 1.0}) for name, mix in REQUESTS]
    return [_greedy(model, tokenizer, mix) for mix in mixes]


@dataclass
class Command:
    name: str
    run: Callable  # (base, adapters, flags, tmp_path, monkeypatch, capsys) -> its output
    oracle: Callable  # (model, tokenizer, tmp_path) -> the output it must equal


COMMANDS = [Command("generate", _generate, _generate_oracle), Command("eval", _eval, _eval_oracle),
            Command("serve", _serve, _serve_oracle)]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
@pytest.mark.parametrize("stored", ["full-precision", "nf4"])
def test_quantize_nf4_equals_the_quantized_model_with_its_adapters(command, stored, tiny_base, nf4_base, adapters,
                                                                   oracle, tmp_path, monkeypatch, capsys):
    base = tiny_base if stored == "full-precision" else nf4_base
    got = command.run(base, adapters, ["--quantize", "nf4"], tmp_path, monkeypatch, capsys)
    assert got == command.oracle(*oracle, tmp_path)
    without = command.run(base, adapters, [], tmp_path, monkeypatch, capsys)
    if stored == "full-precision":  # the flag made the difference: without it the base runs in full precision
        assert without != got
    else:  # a directory `lorakit quantize` wrote is NF4 as stored: the flag changes nothing
        assert without == got
