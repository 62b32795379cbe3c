"""Merged export, `inspect` and `diff`: against the unmerged model and explicit math, on a tiny base
(always) and on the embedded base (when it ships)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from conftest import TOKENIZER_TEXT, randomize_adapters

import lorakit
import lorakit.cli
from lorakit import export, inspection
from lorakit.base import EMBEDDED_BASE, load_base
from lorakit.io import attach_adapters

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")
EMBEDDED_MISSING = pytest.mark.skipif(not (EMBEDDED_BASE / "config.json").is_file(),
                                      reason="the embedded base is not built yet (tiny_base versions still run)")


def _save_adapter(base: str | None, directory, seed: int, scale: float = 0.1, **kw):
    model, _ = load_base(base, device=CPU)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **kw}
    lorakit.inject(model, lorakit.LoraConfig(base_model_name_or_path=lorakit_base_name(base), **kw))
    randomize_adapters(model, seed=seed, scale=scale)
    lorakit.save_adapter(model, directory)
    return directory


def lorakit_base_name(base: str | None) -> str:
    return "lorakit/embedded" if base is None else str(base)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    base = str(tiny_base)
    return {"a": _save_adapter(base, d / "a", seed=1),
            "b": _save_adapter(base, d / "b", seed=2, r=2, target_modules=["q_proj", "o_proj"], use_rslora=True),
            "zero": _save_adapter(base, d / "zero", seed=3, scale=0.0)}


def _cli(monkeypatch, capsys, module, *argv: str) -> tuple[int, str, str]:
    """`lorakit.cli.main` with a parser holding only `module`'s commands."""
    parser = argparse.ArgumentParser(prog="lorakit")
    module.register(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(lorakit.cli, "build_parser", lambda *_: parser)
    capsys.readouterr()
    code = lorakit.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- merge / export -------------------------------------------------------------------------------


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
    code, stdout, _ = _cli(monkeypatch, capsys, export, *argv)
    assert code == 0 and "merged, bf16" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    code, _, err = _cli(monkeypatch, capsys, export, *argv)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, _ = _cli(monkeypatch, capsys, export, *argv[:-2], "--overwrite")
    assert code == 0 and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or old copies left behind

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    code, _, err = _cli(monkeypatch, capsys, export, *argv[:5], "--out", str(precious), "--overwrite")
    assert code == 2 and "not a model directory" in err and (precious / "todo.txt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "{d}/missing"], "not found"),
    (["--adapter", "{a}", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--adapter", "{a}", "--base", "{d}/no_base"], "not found"),
])
def test_merge_user_errors(tiny_base, adapters, tmp_path, monkeypatch, capsys, argv, message):
    argv = [x.format(d=tmp_path, a=adapters["a"]) for x in argv]
    argv = ["merge", *(["--base", str(tiny_base)] if "--base" not in argv else []), *argv, "--out", str(tmp_path / "o")]
    code, _, err = _cli(monkeypatch, capsys, export, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


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
    code, out, _ = _cli(monkeypatch, capsys, inspection, "inspect", str(adapters["a"]))
    assert code == 0
    assert "r=4, lora_alpha=8 (scale 2)" in out and "% of the base's" in out and "KB on disk" in out
    assert sum(line.startswith("model.layers.") for line in out.splitlines()) == 6
    code, _, err = _cli(monkeypatch, capsys, inspection, "inspect", str(adapters["a"] / "nope"))
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
    assert report.mean_kl == pytest.approx(sum(kls) / 2, rel=1e-4)
    assert sorted(c.kl for c in report.top_contexts) == pytest.approx(sorted(kls), rel=1e-4)
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
    code, out, _ = _cli(monkeypatch, capsys, inspection, *argv, "--plot", str(tmp_path / "d.png"))
    assert code == 0 and out.startswith("100 contexts; mean KL")
    assert "tokens that gain most" in out and "tokens that lose most" in out
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC
    code, out, _ = _cli(monkeypatch, capsys, inspection, *argv, "--json")
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
    code, _, err = _cli(monkeypatch, capsys, inspection, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# -- the embedded base ----------------------------------------------------------------------------


@EMBEDDED_MISSING
def test_inspect_diff_and_merge_on_the_embedded_base(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    adapter = _save_adapter(None, tmp_path / "a", seed=1, r=2, target_modules=["q_proj", "v_proj"])
    report = inspection.inspect_adapter(adapter)
    assert report.base_params and report.trainable_params < report.base_params
    code, out, _ = _cli(monkeypatch, capsys, inspection, "diff", "--adapter", str(adapter),
                        "--prompts", "Once upon a time", "The ship", "--top", "3")
    assert code == 0 and "2 contexts" in out
    export.merge_export([str(adapter)], tmp_path / "merged")
    model, tokenizer = load_base(None, device=CPU)
    attach_adapters(model, [str(adapter)])
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
