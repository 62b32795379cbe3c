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


# -- the streamed merge against the in-memory one ----------------------------------------------------


def _saved_base(directory, family, dtype=torch.float32, tied=False, shard=None, quantized=False):
    from conftest import build

    model = build(family)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    if quantized:
        lorakit.nf4.quantize(model)
        lorakit.nf4.save_quantized(model, directory)
    else:
        model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return directory


def _loaded(base_dir):
    """The whole base in fp32: transformers' load, or lorakit's NF4 loader for an NF4 directory."""
    from transformers import AutoModelForCausalLM

    from lorakit.streaming import load_streaming

    if lorakit.nf4.is_quantized(base_dir):
        return load_streaming(base_dir, torch.float32)
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _adapter_for(base_dir, directory, seed, **config):
    from conftest import randomize_adapters

    model = _loaded(base_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=3, lora_alpha=5, **config))
    randomize_adapters(model, seed=seed, scale=0.3)
    with torch.no_grad():  # modules_to_save copies and adapter biases differ from the base's too
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    lorakit.save_adapter(model, directory)
    return directory


def _in_memory_merge(base_dir, specs, out, dtype):
    """The oracle: the whole base in fp32, adapters attached, merged by LoraLayer.merge, cast, save_pretrained."""
    model = _loaded(base_dir)
    lorakit.nf4.dequantize(model)
    attach_adapters(model, specs)
    lorakit.unload(model, merge=True).to(dtype).save_pretrained(out)
    return out


def _weights(directory):
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("family,stored,out,tied,shard,adapters", [
    ("llama", torch.float32, "fp32", False, None,
     [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules="all-linear")]),
    ("llama", torch.bfloat16, "bf16", True, "20KB", [dict(target_modules=["q_proj", "down_proj"])]),
    ("llama", torch.bfloat16, "fp16", False, None, [dict(target_modules=["embed_tokens", "o_proj", "lm_head"])]),
    ("qwen2", torch.float32, "bf16", False, None,
     [dict(target_modules=["q_proj", "k_proj"], bias="all", modules_to_save=["lm_head"]),
      dict(target_modules=["v_proj", "up_proj"], bias="lora_only", use_rslora=True)]),
    ("gpt2", torch.float32, "fp32", True, None, [dict(target_modules=["c_attn", "c_proj", "wpe"])]),
    # tied bases: the adapted head (or embedding) gets a weight of its own in the merged model
    ("llama", torch.float32, "fp32", True, None, [dict(target_modules=["q_proj", "lm_head"])]),
    ("llama", torch.bfloat16, "bf16", True, None,
     [dict(target_modules=["embed_tokens", "v_proj"]), dict(target_modules=["lm_head"])]),
    ("gpt2", torch.float32, "fp32", True, None, [dict(target_modules=["c_attn", "lm_head"])]),
    ("llama", "nf4", "fp32", False, None, [dict(target_modules=["q_proj", "gate_proj"])]),
])
def test_streamed_merge_equals_the_in_memory_merge_bit_for_bit(tmp_path, ids, family, stored, out, tied, shard,
                                                               adapters):
    from transformers import AutoModelForCausalLM

    base = _saved_base(tmp_path / "base", family, None if stored == "nf4" else stored, tied, shard,
                       quantized=stored == "nf4")
    specs = [f"{_adapter_for(base, tmp_path / f'a{i}', seed=i, **config)}:{(0.7, -1.5)[i]}"
             for i, config in enumerate(adapters)]
    merged = tmp_path / "merged"
    merged.mkdir()
    files = export.merge_streaming(base, specs, merged, export.DTYPES[out], max_shard_bytes=12_000)
    assert len(files) > 1 and (merged / "model.safetensors.index.json").is_file()  # sharded, with its index
    expected = _in_memory_merge(base, specs, tmp_path / "expected", export.DTYPES[out])
    ours, theirs = _weights(merged), _weights(expected)
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    a = AutoModelForCausalLM.from_pretrained(merged).eval()
    b = AutoModelForCausalLM.from_pretrained(expected).eval()
    assert a.config.dtype == b.config.dtype == export.DTYPES[out]
    assert torch.equal(a(ids).logits, b(ids).logits)


def _with_tokenizer(base, tiny_base):
    import shutil

    for file in tiny_base.iterdir():
        if "token" in file.name:
            shutil.copy(file, base / file.name)
    return base


def test_a_streamed_merge_refuses_what_the_in_memory_one_refuses(tmp_path, tiny_base):
    base = _saved_base(tmp_path / "base", "llama", tied=True)
    adapter = _adapter_for(base, tmp_path / "a", seed=0, target_modules=["q_proj"])
    with pytest.raises(lorakit.UserError, match="cannot load the tokenizer"):
        export.merge_export([str(adapter)], tmp_path / "out", base=str(base))
    _with_tokenizer(base, tiny_base)
    other = _saved_base(tmp_path / "other", "qwen2")
    with pytest.raises(lorakit.UserError, match="different base|lacks"):
        export.merge_export([str(_adapter_for(other, tmp_path / "b", seed=0, target_modules=["q_proj"], bias="all"))],
                            tmp_path / "out", base=str(base))
    assert not (tmp_path / "out").exists()


def test_a_broken_base_leaves_no_output(tmp_path, tiny_base):
    from safetensors.torch import load_file, save_file

    base = _with_tokenizer(_saved_base(tmp_path / "base", "llama"), tiny_base)
    adapter = _adapter_for(base, tmp_path / "a", seed=0, target_modules=["q_proj"])
    tensors = load_file(base / "model.safetensors")
    tensors.pop("model.layers.1.self_attn.q_proj.weight")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(lorakit.UserError, match="lack model.layers.1.self_attn.q_proj.weight"):
        export.merge_export([str(adapter)], tmp_path / "out", base=str(base))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]


def test_the_streamed_merge_never_holds_the_base(tmp_path):
    """Peak RSS of a streamed merge, over the RSS just before it, stays well under the fp32 base it reads
    and writes (in a subprocess, so the peak is the merge's own): 8 layers of width 384, random weights."""
    import os
    import subprocess
    import sys
    import textwrap

    from conftest import VOCAB
    from transformers import LlamaConfig

    from lorakit.streaming import skeleton
    from lorakit.tensorfiles import Planned, write_shards

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=64)
    base = tmp_path / "wide"
    base.mkdir()
    config.save_pretrained(base)
    generator = torch.Generator().manual_seed(0)
    plan = [Planned(name, torch.float32, tuple(p.shape), lambda p=p: torch.randn(p.shape, generator=generator) * 0.02)
            for name, p in skeleton(config, torch.float32).state_dict().items()]
    write_shards(base, plan, max_shard_bytes=8 << 20)
    model = skeleton(config, torch.float32)
    model.to_empty(device="cpu")
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    lorakit.save_adapter(model, tmp_path / "a")
    script = textwrap.dedent(f"""
        import gc, pathlib, shutil, torch
        from lorakit.export import merge_streaming
        status = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
        def merge(name):
            out = pathlib.Path({str(tmp_path)!r}) / name
            out.mkdir()
            merge_streaming(pathlib.Path({str(base)!r}), [{str(tmp_path / "a")!r}], out, torch.float32)
        merge("warm")  # once first: every import and first-use allocation is done
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")  # Linux: the peak (VmHWM) restarts from here
        before = status("VmRSS:")
        merge("measured")
        print(status("VmHWM:") - before)
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # see test_streaming: freed reads go back
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env=env).stdout)
    fp32 = sum(p.nbytes for p in plan)
    # one weight read, its fp32 copy and update (~1.6 MB each) and the written copy; the adapter (2 MB)
    assert grown < 0.2 * fp32, f"peak grew by {grown / 1e6:.0f} MB while merging {fp32 / 1e6:.0f} MB of fp32 weights"
    assert torch.equal(_weights(tmp_path / "measured")["model.norm.weight"], _weights(base)["model.norm.weight"])
