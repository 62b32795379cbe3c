"""`inspect` and `diff`: against explicit math on a tiny base (merged export: test_export.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from commands import CPU, PNG_MAGIC, adapters, run_cli  # noqa: F401 (adapters: a fixture)
from conftest import TOKENIZER_TEXT

import lorakit
from lorakit import inspection
from lorakit.base import load_base
from lorakit.io import attach_adapters


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_reports_the_update_spectrum(tiny_base, adapters, tmp_path):
    report = inspection.inspect_adapter(adapters["b"], plot=tmp_path / "b.png")
    model, _ = load_base(str(tiny_base), device=CPU)
    lorakit.load_adapter(model, adapters["b"])
    layers = dict(lorakit.lora_layers(model))
    assert sorted(layer.module for layer in report.layers) == sorted(layers)
    for layer in report.layers:
        delta = layers[layer.module].delta_weight("default")  # the oracle: the layer's own ΔW
        expected = torch.linalg.svdvals(delta.double())[: layer.rank]
        assert torch.allclose(torch.tensor(layer.singular_values, dtype=torch.float64), expected, rtol=1e-5, atol=1e-7)
        assert layer.norm == pytest.approx(float(delta.norm()), rel=1e-5)
        assert layer.scale == pytest.approx(8 / math.sqrt(2))  # rslora: alpha / sqrt(r)
        assert 1 <= layer.effective_rank <= layer.rank
    adapter_params = sum(p.numel() for layer in layers.values() for p in (*layer.lora_A.values(),
                                                                           *layer.lora_B.values()))
    assert report.trainable_params == adapter_params
    assert report.base_params == lorakit.trainable_parameters(model).total - adapter_params
    assert report.bytes_on_disk == sum(p.stat().st_size for p in adapters["b"].iterdir())  # just the two files
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_effective_rank_is_r_for_equal_values_and_1_for_one():
    assert inspection.effective_rank(torch.ones(5)) == pytest.approx(5)
    assert inspection.effective_rank(torch.tensor([3.0, 0, 0])) == pytest.approx(1)
    assert inspection.effective_rank(torch.zeros(3)) == 0


def test_inspect_cli_prints_a_row_per_module(adapters, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, inspection, "inspect", str(adapters["a"]))
    assert code == 0
    assert "r=4, lora_alpha=8 (scale 2)" in out and "% of the base's" in out and "KB on disk" in out
    assert sum(line.startswith("model.layers.") for line in out.splitlines()) == 6
    code, _, err = run_cli(monkeypatch, capsys, inspection, "inspect", str(adapters["a"] / "nope"))
    assert code == 2 and "not found" in err


# -- diff -----------------------------------------------------------------------------------------


def test_diff_matches_explicit_kl_and_probability_shifts(tiny_base, adapters):
    prompts = ["The captain saw", "we sail north"]
    report = inspection.diff_adapters([str(adapters["a"])], base=str(tiny_base), prompts=prompts, top=5)
    model, tokenizer = load_base(str(tiny_base), device=CPU)
    attach_adapters(model, [str(adapters["a"])])
    kls, shift = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            p = model(ids).logits[0, -1].softmax(-1).double()
            with lorakit.disable_adapters(model):
                q = model(ids).logits[0, -1].softmax(-1).double()
        kls.append(float((p * (p / q).log()).sum()))
        shift = shift + (p - q) / len(prompts)
    assert report.contexts == 2
    # The report sums p * (log p - log q) over the vocabulary in fp32: log-probabilities near -5 carry ~3e-7 of
    # rounding each, so a KL of ~3e-3 is good to ~3e-7 absolute (seen: 3.2e-7 with one thread per process)
    assert report.mean_kl == pytest.approx(sum(kls) / 2, rel=1e-4, abs=1e-6)
    assert sorted(c.kl for c in report.top_contexts) == pytest.approx(sorted(kls), rel=1e-4, abs=1e-6)
    assert [s.token_id for s in report.gained] == shift.topk(5).indices.tolist()
    assert [s.token_id for s in report.lost] == (-shift).topk(5).indices.tolist()


def test_diff_of_a_zero_adapter_changes_nothing(tiny_base, adapters):
    report = inspection.diff_adapters([str(adapters["zero"])], base=str(tiny_base), prompts=["The ship"])
    assert report.mean_kl == 0 and all(s.change == 0 for s in report.gained + report.lost)


def test_diff_cli_over_data_writes_table_json_and_chart(tiny_base, adapters, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": line}) for line in TOKENIZER_TEXT.splitlines()[:30]))
    argv = ("diff", "--adapter", str(adapters["a"]), "--base", str(tiny_base), "--data", str(data),
            "--max-contexts", "100", "--seq-len", "32", "--top", "4")
    code, out, _ = run_cli(monkeypatch, capsys, inspection, *argv, "--plot", str(tmp_path / "d.png"))
    assert code == 0 and out.startswith("100 contexts; mean KL")
    assert "tokens that gain most" in out and "tokens that lose most" in out
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC
    code, out, _ = run_cli(monkeypatch, capsys, inspection, *argv, "--json")
    report = json.loads(out)
    assert code == 0 and report["contexts"] == 100 and len(report["gained"]) == 4
    assert all(g["change"] > 0 for g in report["gained"]) and all(s["change"] < 0 for s in report["lost"])


@pytest.mark.parametrize("argv, message", [
    ([], "either --data FILE or --prompts"),
    (["--data", "{d}/x.txt", "--prompts", "hi"], "either --data FILE or --prompts"),
    (["--data", "{d}/missing.txt"], "not found"),
    (["--data", "{d}/bad.jsonl"], "bad.jsonl:2: broken JSON"),
    (["--prompts", "hi", "--top", "0"], "--top must be positive"),
])
def test_diff_user_errors(tiny_base, adapters, tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "x.txt").write_text("The ship")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    argv = ["diff", "--adapter", str(adapters["a"]), "--base", str(tiny_base), *(a.format(d=tmp_path) for a in argv)]
    code, _, err = run_cli(monkeypatch, capsys, inspection, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1




