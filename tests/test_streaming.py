"""Streaming load (meta skeleton, tensor by tensor, NF4 on arrival) against transformers' load + quantize.

The oracle is today's path: `from_pretrained`, then `nf4.quantize` over the whole model, then the compute
dtype. The streamed model must hold the same NF4 bytes, the same other weights and buffers, share tied
weights the same way, and give the same logits bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, build, logits
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorakit import nf4
from lorakit.errors import UserError
from lorakit.tensorfiles import Planned, stored_tensors, write_shards
from lorakit.streaming import load_streaming, skeleton

NF4_BUFFERS = ("packed", "absmax", "absmax_scale", "absmax_offset")


def _saved(tmp_path, family="llama", tied=False, dtype=torch.float32, shard=None):
    model = build(family)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    directory = tmp_path / f"{family}-{tied}-{dtype}-{shard}"
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return directory


def _oracle(directory, dtype, spec):
    """Today's path: load whole, quantize whole. The NF4 codes come from the stored values (loaded in
    fp32, exact for any stored dtype), then the model takes the compute dtype."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    exact = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    nf4.quantize(exact, spec.kind, blocksize=spec.blocksize, double_quant=spec.double_quant, include=spec.include)
    for name, module in exact.named_modules():
        if isinstance(module, nf4.NF4Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.to(dtype))  # NF4 bytes kept, compute dtype set
    return model


def _assert_same(streamed, oracle):
    ours, theirs = dict(streamed.named_modules()), dict(oracle.named_modules())
    assert ours.keys() == theirs.keys()
    for name, module in theirs.items():
        assert type(ours[name]) is type(module), name
        if isinstance(module, nf4.NF4Linear):
            assert ours[name].dtype == module.dtype
            for buffer in NF4_BUFFERS:
                a, b = getattr(ours[name], buffer), getattr(module, buffer)
                assert (a is None and b is None) or torch.equal(a, b), f"{name}.{buffer}"
    state, expected = streamed.state_dict(), oracle.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    for (name, a), (_, b) in zip(streamed.named_buffers(), oracle.named_buffers()):  # inv_freq too
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family,tied,stored,compute,shard,spec", [
    ("llama", False, torch.float32, torch.float32, None, nf4.QuantizeSpec()),
    ("llama", True, torch.bfloat16, torch.float32, None, nf4.QuantizeSpec()),
    ("llama", False, torch.bfloat16, torch.bfloat16, "20KB", nf4.QuantizeSpec(blocksize=128, double_quant=False)),
    ("qwen2", True, torch.float32, torch.float32, "30KB", nf4.QuantizeSpec(include=["q_proj", "v_proj"])),
    ("qwen2", False, torch.float32, torch.bfloat16, None, nf4.QuantizeSpec(include=".*mlp.*")),
])
def test_streamed_nf4_equals_load_then_quantize(tmp_path, ids, family, tied, stored, compute, shard, spec):
    directory = _saved(tmp_path, family, tied, stored, shard)
    if shard:
        assert (directory / "model.safetensors.index.json").is_file()
    streamed, oracle = load_streaming(directory, compute, quantize=spec), _oracle(directory, compute, spec)
    _assert_same(streamed, oracle)
    assert torch.equal(logits(streamed, ids), logits(oracle, ids))
    if tied:  # one parameter under both names, as tie_weights() leaves it
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


def test_a_tied_head_named_for_nf4_is_quantized_from_the_shared_weight(tmp_path, ids):
    directory = _saved(tmp_path, "llama", tied=True)
    assert "lm_head.weight" not in stored_tensors(directory)
    spec = nf4.QuantizeSpec(include=["q_proj", "lm_head"])
    streamed = load_streaming(directory, torch.float32, quantize=spec)
    assert isinstance(streamed.lm_head, nf4.NF4Linear)
    assert torch.equal(logits(streamed, ids), logits(_oracle(directory, torch.float32, spec), ids))


def test_without_quantize_it_equals_from_pretrained(tmp_path, ids):
    directory = _saved(tmp_path, "llama", tied=True, dtype=torch.bfloat16)
    streamed = load_streaming(directory, torch.float32)
    expected = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    _assert_same(streamed, expected)
    assert torch.equal(logits(streamed, ids), logits(expected, ids))


def test_the_skeleton_holds_no_weights_and_real_buffers():
    model = skeleton(build("llama").config, torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied config
    assert torch.equal(next(model.buffers()), next(build("llama").buffers()))  # inv_freq


def _rewrite(directory, change):
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_keys_for_computed_buffers_are_skipped(tmp_path, ids):
    directory = _saved(tmp_path)
    _rewrite(directory, lambda t: t.update({"model.rotary_emb.inv_freq": torch.zeros(4)}))  # older checkpoints
    model = load_streaming(directory, torch.float32, quantize=nf4.QuantizeSpec())
    assert torch.equal(logits(model, ids), logits(_oracle(_saved(tmp_path / "b"), torch.float32,
                                                          nf4.QuantizeSpec()), ids))


def test_keys_without_the_base_model_prefix_are_found(tmp_path, ids):
    directory = _saved(tmp_path)
    _rewrite(directory, lambda t: t.update({k.removeprefix("model."): t.pop(k) for k in list(t)
                                            if k.startswith("model.")}))
    model = load_streaming(directory, torch.float32)
    assert torch.equal(logits(model, ids), logits(build("llama"), ids))


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "lack model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.pop("model.norm.weight"), "lack model.norm.weight"),
    (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), "model.extra.weight fits no weight"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(5)}), r"model.norm.weight is \(5,\) in the checkpoint"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 32)}),
     r"does not fit|is \(3, 32\)"),
])
def test_missing_unexpected_and_misshapen_weights_are_one_clear_error(tmp_path, change, message):
    directory = _saved(tmp_path)
    _rewrite(directory, change)
    for spec in (None, nf4.QuantizeSpec()):
        with pytest.raises(UserError, match=message):
            load_streaming(directory, torch.float32, quantize=spec)


def test_a_broken_nf4_quant_state_is_one_clear_error(tmp_path):
    directory = _saved(tmp_path)
    model = load_streaming(directory, torch.float32, quantize=nf4.QuantizeSpec())
    nf4.save_quantized(model, tmp_path / "q")
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    _rewrite(tmp_path / "q", lambda t: t.update({key: torch.tensor(list(b'{"shape": [1]}'), dtype=torch.uint8)}))
    with pytest.raises(UserError, match="up_proj.weight"):
        load_streaming(tmp_path / "q", torch.float32)


def test_a_config_that_is_no_causal_lm_is_one_clear_error(tmp_path):
    directory = _saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UserError):
        load_streaming(directory, torch.float32, quantize=nf4.QuantizeSpec())


def test_the_full_precision_base_never_exists_in_memory(tmp_path):
    """Peak RSS of a streamed NF4 load, over the RSS just before it, stays well under the fp32 weights it
    reads (in a subprocess, so the peak is the load's own): 8 layers of width 384, random weights."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=64)
    directory = tmp_path / "wide"
    directory.mkdir()
    config.save_pretrained(directory)
    model = skeleton(config, torch.float32)
    generator = torch.Generator().manual_seed(0)
    plan = [Planned(name, torch.float32, tuple(p.shape), lambda p=p: torch.randn(p.shape, generator=generator) * 0.02)
            for name, p in model.state_dict().items()]
    write_shards(directory, plan, max_shard_bytes=8 << 20)
    script = textwrap.dedent(f"""
        import gc, torch
        from lorakit import nf4
        from lorakit.streaming import load_streaming
        status = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
        load = lambda: load_streaming({str(directory)!r}, torch.float32, quantize=nf4.QuantizeSpec())
        load()  # once first: every import and first-use allocation is done
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")  # Linux: the peak (VmHWM) restarts from here
        before = status("VmRSS:")
        model = load()
        print(status("VmHWM:") - before)
    """)
    # glibc's malloc would keep MB-sized reads in its heap once freed (its mmap threshold adapts upwards)
    # and hand them to the second load; a fixed threshold returns them, so the second load pays its own
    # way, as at real sizes anyway (tensors over 32 MB are always mapped).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               env=env).stdout)
    fp32 = sum(p.nbytes for p in plan)
    # the NF4 model (~1/7.8 of fp32: 7 MB) + one tensor as read and its working copies (a few MB)
    assert grown < 0.35 * fp32, f"peak grew by {grown / 1e6:.0f} MB while loading {fp32 / 1e6:.0f} MB of fp32 weights"
