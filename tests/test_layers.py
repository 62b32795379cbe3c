"""`LoraLayer` against the explicit formula W + Σ w·s·B·A, in each precision, and its forward dispatch."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, build, logits, randomize_adapters
from torch import nn

import lorakit
from lorakit.layers import LoraLayer


def _oracle_weight(layer: LoraLayer, name: str, weight: float = 1.0) -> torch.Tensor:
    """W + w·s·B·A written out by hand, in the (out, in) layout."""
    W = layer.base.weight.detach()
    if layer.kind != "linear":
        W = W.t()
    return W + weight * layer.scaling[name] * layer.lora_B[name].detach() @ layer.lora_A[name].detach()


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("family,module", [("mlp", "up"), ("gpt2", "c_attn"), ("mlp", "embed")])
def test_layer_matches_explicit_formula(family, module, use_rslora, ids):
    model = build(family)
    config = lorakit.LoraConfig(r=3, lora_alpha=5, target_modules=[module], use_rslora=use_rslora)
    lorakit.inject(model, config)
    randomize_adapters(model)
    _, layer = next(lorakit.lora_layers(model))
    expected_scale = 5 / 3 ** 0.5 if use_rslora else 5 / 3
    assert layer.scaling["default"] == pytest.approx(expected_scale)
    W = _oracle_weight(layer, "default")
    if layer.kind == "embedding":
        x = ids
        expected = W.t()[x]
    else:
        x = torch.randn(4, layer.in_features)
        expected = x @ W.t() + layer.base.bias.detach()
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,module", [("mlp", "up"), ("gpt2", "c_attn"), ("mlp", "embed")])
@pytest.mark.parametrize("weight", [1.0, 0.7, -1.5])
def test_merge_rounds_as_the_formula_written_in_fp32_steps(family, module, weight):
    """A merge adds fl(fl(fl(B·A)·s)·w) to the fp32 weight, step by step: exactly those bits (a streamed merge and
    an in-memory one must agree bit for bit, and a merged file must not change with the code's layout of it)."""
    model = build(family)
    lorakit.inject(model, lorakit.LoraConfig(r=3, lora_alpha=5, target_modules=[module]))
    randomize_adapters(model, scale=0.3)
    _, layer = next(lorakit.lora_layers(model))
    B, A = layer.lora_B["default"].detach(), layer.lora_A["default"].detach()
    delta = (B @ A) * layer.scaling["default"] * weight  # (out, in)
    delta = delta if layer.kind == "linear" else delta.t()  # laid out like the base weight
    assert torch.equal(layer.delta_weight("default", weight), delta)
    W = layer.base.weight.detach().clone()
    lorakit.set_adapters(model, {"default": weight})
    layer.merge()
    assert torch.equal(layer.base.weight, W + delta)
    layer.unmerge()
    assert torch.equal(layer.base.weight, W + delta - delta)


def test_several_adapters_sum_with_their_weights(ids):
    model = build("mlp")
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["up"]), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=5, lora_alpha=3, target_modules=["up", "down"]), adapter="b")
    randomize_adapters(model)
    lorakit.set_adapters(model, {"a": 1.0, "b": 0.5})
    up = model.up
    x = torch.randn(7, 24)
    W = _oracle_weight(up, "a", 1.0) + _oracle_weight(up, "b", 0.5) - up.base.weight.detach()
    assert torch.allclose(up(x), x @ W.t() + up.base.bias, atol=1e-5)
    assert lorakit.active_adapters(model) == {"a": 1.0, "b": 0.5}
    # scale 0 for every adapter is the base
    lorakit.set_adapters(model, {"a": 0.0, "b": 0.0})
    with lorakit.disable_adapters(model):
        base_out = logits(model, ids)
    assert torch.allclose(logits(model, ids), base_out, atol=1e-6)


def test_bf16_base_keeps_fp32_adapter_and_trains(ids):
    model = build("llama").to(torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=FAMILIES["llama"][1]))
    layer = next(layer for _, layer in lorakit.lora_layers(model))
    assert layer.lora_A["default"].dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    model.train()
    logits(model, ids).float().mean().backward()
    assert layer.lora_B["default"].grad is not None


def test_hooked_or_trainable_base_takes_the_plain_path():
    """The fused path is for a frozen base that no hook watches; anything else runs plain autograd ops."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(12, 10))
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    randomize_adapters(model, scale=0.3)
    layer = model.proj
    assert layer.fusable()
    seen = []
    handle = layer.base.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not layer.fusable()
    layer(torch.randn(2, 12))
    assert seen == [(2, 10)]
    handle.remove()
    layer.base.weight.requires_grad_(True)
    assert not layer.fusable()
    x = torch.randn(5, 12, requires_grad=True)
    out = layer(x)
    expected = x @ _oracle_weight(layer, "default").t() + layer.base.bias
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert layer.base.weight.grad is not None and layer.lora_A["default"].grad is not None
