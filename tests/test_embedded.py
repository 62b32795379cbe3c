"""The shipped base and corpora: loadable by transformers, and the CLI works on them end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.base import CORPORA, EMBEDDED_BASE, load_base
from lorakit.cli import main
from lorakit.demo import corpora


def test_embedded_base_is_a_standard_transformers_directory():
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_BASE)
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 <= n <= 15e6
    assert model.config.model_type == "llama"
    size = sum(f.stat().st_size for f in EMBEDDED_BASE.iterdir())
    assert size <= 30e6
    text = "The ship sailed at dawn.\nIt was 3 o'clock; all's well!"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_shipped_corpora_have_train_and_heldout_splits():
    names = corpora()
    assert len(names) >= 2
    for name in names:
        train, held = (CORPORA / name / "train.txt").read_text(), (CORPORA / name / "heldout.txt").read_text()
        assert 100_000 <= len(train.encode()) <= 3_000_000, name
        assert len(held) > 10_000 and held[:2000] not in train, name
    assert (CORPORA / "general" / "heldout.txt").is_file()


def test_default_base_loads_in_python():
    model, tokenizer = load_base()
    assert model.training is False and tokenizer.pad_token_id is not None


@pytest.mark.auto_dtype  # the CLI's defaults, as a user runs them: under both CPU policies in `make test`
def test_cli_train_generate_eval_on_the_embedded_base(tmp_path, capsys):
    corpus = corpora()[0]
    data = tmp_path / "d.txt"
    data.write_text((CORPORA / corpus / "train.txt").read_text()[:20_000])
    out = tmp_path / "adapter"
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2",
                 "--seq-len", "64", "--r", "4", "--quiet"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "lorakit/embedded"
    assert main(["generate", "--adapter", f"{out}:1.0", "--prompt", "The", "--max-new-tokens", "5",
                 "--compare"]) == 0
    assert "── base" in capsys.readouterr().out
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--max-batches", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["base"]["perplexity"] > 1 and torch.isfinite(torch.tensor(result["adapted"]["nll"]))
