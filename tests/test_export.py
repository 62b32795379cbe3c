"""Merged export (`lorakit merge`): against the unmerged model, on a tiny base and on the embedded one."""

from __future__ import annotations

import json

import pytest
import torch
from commands import CPU, EMBEDDED_MISSING, adapters, run_cli, save_random_adapter  # noqa: F401 (adapters: a fixture)
from conftest import TOKENIZER_TEXT

import lorakit
from lorakit import export, inspection
from lorakit.base import load_base
from lorakit.io import attach_adapters


def test_merged_export_loads_in_transformers_with_the_unmerged_logits(tiny_base, adapters, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    specs = [f"{adapters['a']}:0.7", f"{adapters['b']}:-1.5"]
    export.merge_export(specs, tmp_path / "merged", base=str(tiny_base))

    unmerged, tokenizer = load_base(str(tiny_base), device=CPU)
    attach_adapters(unmerged, specs)
    ids = tokenizer(TOKENIZER_TEXT[:200], return_tensors="pt")["input_ids"]
    expected = unmerged(ids).logits
    with lorakit.disable_adapters(unmerged):
        assert not torch.allclose(unmerged(ids).logits, expected, atol=1e-3)  # the adapters do something

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert torch.allclose(merged(ids).logits, expected, atol=1e-5, rtol=0)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert reloaded(TOKENIZER_TEXT[:200])["input_ids"] == ids[0].tolist()


def test_bf16_export_and_overwrite_rules(tiny_base, adapters, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m"
    argv = ("merge", "--base", str(tiny_base), "--adapter", str(adapters["a"]), "--out", str(out), "--dtype", "bf16")
    code, stdout, _ = run_cli(monkeypatch, capsys, export, *argv)
    assert code == 0 and "merged, bf16" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    code, _, err = run_cli(monkeypatch, capsys, export, *argv)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, _ = run_cli(monkeypatch, capsys, export, *argv[:-2], "--overwrite")
    assert code == 0 and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or old copies left behind

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, export, *argv[:5], "--out", str(precious), "--overwrite")
    assert code == 2 and "not a model directory" in err and (precious / "todo.txt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "{d}/missing"], "not found"),
    (["--adapter", "{a}", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--adapter", "{a}", "--base", "{d}/no_base"], "not found"),
])
def test_merge_user_errors(tiny_base, adapters, tmp_path, monkeypatch, capsys, argv, message):
    argv = [x.format(d=tmp_path, a=adapters["a"]) for x in argv]
    argv = ["merge", *(["--base", str(tiny_base)] if "--base" not in argv else []), *argv, "--out", str(tmp_path / "o")]
    code, _, err = run_cli(monkeypatch, capsys, export, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@EMBEDDED_MISSING
def test_inspect_diff_and_merge_on_the_embedded_base(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    adapter = save_random_adapter(None, tmp_path / "a", seed=1, r=2, target_modules=["q_proj", "v_proj"])
    report = inspection.inspect_adapter(adapter)
    assert report.base_params and report.trainable_params < report.base_params
    code, out, _ = run_cli(monkeypatch, capsys, inspection, "diff", "--adapter", str(adapter),
                        "--prompts", "Once upon a time", "The ship", "--top", "3")
    assert code == 0 and "2 contexts" in out
    export.merge_export([str(adapter)], tmp_path / "merged")
    model, tokenizer = load_base(None, device=CPU)
    attach_adapters(model, [str(adapter)])
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
