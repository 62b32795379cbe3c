"""Sampling with adapters at scales, through the CLI and in Python."""

from __future__ import annotations

import io

import pytest
import torch
from commands import trained_adapter as adapter  # noqa: F401 (a fixture)

from lorakit.cli import main
from lorakit.generate import GenerateConfig, Sampling, generate, next_token


def _gen(tiny_base, adapters, compare=False, **kw):
    sink = io.StringIO()
    sampling = Sampling(max_new_tokens=12, **kw)
    config = GenerateConfig(prompt="the crew", adapters=adapters, base=str(tiny_base), compare=compare, dtype="fp32")
    texts = generate(config, sampling, out=sink)
    return texts, sink


def test_greedy_is_deterministic_and_adapter_changes_it(tiny_base, adapter):
    base_run, _ = _gen(tiny_base, [], greedy=True)
    adapted, _ = _gen(tiny_base, [str(adapter)], greedy=True)
    again, _ = _gen(tiny_base, [str(adapter)], greedy=True)
    assert adapted == again
    assert list(adapted.values()) != list(base_run.values())


def test_scale_zero_generates_like_the_base(tiny_base, adapter):
    base_run, _ = _gen(tiny_base, [], seed=5)
    zero, _ = _gen(tiny_base, [f"{adapter}:0"], seed=5)
    assert list(zero.values()) == list(base_run.values())


def test_compare_streams_both_with_the_same_seed(tiny_base, adapter):
    texts, sink = _gen(tiny_base, [f"{adapter}:1.5"], seed=3, compare=True)
    assert list(texts) == ["base", "a:1.5"]
    alone, _ = _gen(tiny_base, [], seed=3)
    assert texts["base"] == alone["base"]
    shown = sink.getvalue()
    assert "── base" in shown and "── a:1.5" in shown and texts["a:1.5"] in shown


def test_next_token_filters():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, Sampling(greedy=True), g) == 1
    assert {next_token(logits, Sampling(top_k=1), g) for _ in range(20)} == {1}
    assert {next_token(logits, Sampling(top_k=0, top_p=0.01), g) for _ in range(20)} == {1}
    assert {next_token(logits, Sampling(top_k=2, temperature=5.0), g) for _ in range(50)} == {1, 3}


@pytest.mark.auto_dtype
def test_generate_cli_errors(tiny_base, capsys):
    assert main(["generate", "--base", str(tiny_base), "--prompt", "x", "--compare"]) == 2
    assert "--compare needs" in capsys.readouterr().err
    assert main(["generate", "--base", str(tiny_base), "--prompt", "x", "--adapter", "/no/such"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "--base", str(tiny_base), "--prompt", "x", "--top-p", "0"]) == 2
