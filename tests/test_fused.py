"""The fused fast path (`lorakit.fused`) against plain autograd over the explicit math.

`FusedLoraLinear` (the fused base + LoRA Function) must give the values and gradients that autograd
gives for y = x·Wᵀ + b + Σ w·s·B·A·dropout(x), and save no more than it needs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters
from torch import nn

import lorakit
from lorakit.fused import FusedLoraLinear
from lorakit.layers import LoraLayer


def _layer(kind: str = "linear", r: int = 4, dropout: float = 0.0, bias: str = "none", dtype=torch.float32):
    """A LoRA'd Linear (or GPT-2 Conv1D) inside a one-module model, with random A and B."""
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(12, 10).to(dtype)
    else:
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(10, 12).to(dtype)  # (nf=out, nx=in); weight is (in, out)
        nn.init.normal_(base.bias)
    model = nn.Sequential()
    model.add_module("proj", base)
    lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"],
                                             bias=bias))
    randomize_adapters(model, scale=0.3)
    model.train()
    return model.proj


def _oracle(layer: LoraLayer, x: torch.Tensor, masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The explicit formula with plain autograd ops; `masks` are the dropout multipliers to reuse."""
    W = layer.base.weight if layer.kind == "linear" else layer.base.weight.t()
    y = x @ W.t() + layer.base.bias
    for name, w in layer.active.items():
        xa = x * masks[name] if masks else x
        y = y + w * layer.scaling[name] * (xa @ layer.lora_A[name].t()) @ layer.lora_B[name].t()
    return y


def _grads(layer: LoraLayer, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in layer.parameters() if p.requires_grad]
    return torch.autograd.grad(out, [x, *params], g)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_fused_values_and_gradients_match_autograd(kind, bias):
    layer = _layer(kind, bias=bias)
    assert layer.fusable()
    x = torch.randn(3, 5, 12, requires_grad=True)
    g = torch.randn(3, 5, 10)
    fast = layer(x)
    slow = _oracle(layer, x)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(layer, x, fast, g), _grads(layer, x, slow, g)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    if bias == "lora_only":
        assert layer.base.bias.requires_grad


def test_fused_gradients_with_dropout_match_autograd_with_the_same_mask():
    layer = _layer(dropout=0.4)
    x = torch.randn(4, 6, 12, requires_grad=True)
    g = torch.randn(4, 6, 10)
    torch.manual_seed(7)
    fast = layer(x)
    torch.manual_seed(7)  # the same draw: one dropout of the same number of elements
    mask = F.dropout(torch.ones(4 * 6, 12), p=0.4, training=True).view(4, 6, 12)
    slow = _oracle(layer, x, {"default": mask})
    assert not torch.allclose(_oracle(layer, x), slow)  # the mask does something
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(layer, x, fast, g), _grads(layer, x, slow, g)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_fused_several_adapters_with_weights_match_autograd():
    layer = _layer()
    layer.add_adapter("b", r=3, scaling=0.7, dropout=0.0, init=False)
    layer.active = {"default": 1.0, "b": -0.5}
    x = torch.randn(9, 12, requires_grad=True)
    g = torch.randn(9, 10)
    fast, slow = layer(x), _oracle(layer, x)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(layer, x, fast, g), _grads(layer, x, slow, g)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_function_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    f64 = torch.float64
    x = torch.randn(6, 5, dtype=f64, requires_grad=True)
    W = torch.randn(4, 5, dtype=f64)
    b = torch.randn(4, dtype=f64, requires_grad=True)
    A1, B1 = (torch.randn(s, dtype=f64, requires_grad=True) for s in ((2, 5), (4, 2)))
    A2, B2 = (torch.randn(s, dtype=f64, requires_grad=True) for s in ((3, 5), (4, 3)))

    def f(x, b, A1, B1, A2, B2):
        return FusedLoraLinear.apply(x, W, b, (0.5, -2.0), (0.0, 0.0), (f64, f64), A1, B1, A2, B2)

    assert torch.autograd.gradcheck(f, (x, b, A1, B1, A2, B2))

    def dropped(x, b, A1, B1, A2, B2):  # the same mask on every call: the function is then smooth
        torch.manual_seed(3)
        return FusedLoraLinear.apply(x, W, b, (0.5, -2.0), (0.5, 0.0), (f64, f64), A1, B1, A2, B2)

    assert torch.autograd.gradcheck(dropped, (x, b, A1, B1, A2, B2))


def test_fused_saves_x_once_and_nothing_of_output_size():
    layer = _layer(r=4)
    layer.base = nn.Linear(256, 512)  # out > in, so an (N, out) tensor would stand out
    layer.base.requires_grad_(False)
    layer.in_features, layer.out_features = 256, 512
    layer.lora_A["default"] = nn.Parameter(torch.randn(4, 256))
    layer.lora_B["default"] = nn.Parameter(torch.randn(512, 4))
    x = torch.randn(64, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.shape[0] == 64]  # saved per-token tensors
    assert sum(t.numel() for t in activations) == 64 * 256 + 64 * 4  # x and the rank-r h, once each


def test_bf16_autocast_follows_the_plain_path_and_keeps_fp32_grads():
    layer = _layer()
    x = torch.randn(8, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = _oracle(layer, x)
    assert fast.dtype == torch.bfloat16
    assert torch.allclose(fast.float(), slow.float(), atol=0.1, rtol=0.05)
    fast.float().sum().backward()
    assert layer.lora_A["default"].grad.dtype == torch.float32
    assert layer.lora_B["default"].grad.dtype == torch.float32 and x.grad is not None


def test_bf16_base_without_autocast_matches_fp32_math():
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(8, 12, dtype=torch.bfloat16)
    W, b = layer.base.weight.float(), layer.base.bias.float()
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    expected = x.float() @ W.t() + b + s * (x.float() @ A.t()) @ B.t()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.02)


def test_fused_dropout_equals_nn_dropout_with_the_same_seed_and_keeps_a_byte_mask():
    """Dropout inside `FusedLoraLinear` draws what `nn.Dropout` draws (CPU) and keeps x plus a bool mask,
    not the dropped-out copy and its float noise."""
    layer = _layer(r=4)
    layer.add_adapter("b", r=3, scaling=0.7, dropout=0.0, init=False)
    layer.dropout["default"] = nn.Dropout(0.3)
    layer.active = {"default": 1.0, "b": -0.5}
    layer.train()
    x = torch.randn(9, 12)
    g = torch.randn(9, 10)
    results = []
    for plain in (False, True):
        hook = layer.base.register_forward_pre_hook(lambda *_: None) if plain else None  # a hook: plain ops
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(xi)
        y.backward(g)
        results.append((y.detach(), xi.grad, *(p.grad.clone() for p in layer.parameters() if p.grad is not None)))
        layer.zero_grad(set_to_none=True)
        if hook:
            hook.remove()
        else:
            per_token = [t for t in saved if t.shape[0] == 9 and t.dim() == 2 and t.shape[1] == 12]
            assert sorted(str(t.dtype) for t in per_token) == ["torch.bool", "torch.float32"]  # x, the mask
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain)
    assert not torch.equal(results[0][0], layer.eval()(x))  # the mask really dropped something
