"""Inference with packed base weights (`lorakit.packed`): bf16 on AMX / AVX-512-BF16 CPUs, fp32 where fp32
products go to oneDNN; and the few-row inference path of `LoraLayer.add_update` (full-precision adapter
products on a low-precision base).

The bf16 packed tests need oneDNN's bf16 kernels (AVX-512 / AMX hosts) and skip elsewhere; the fp32 ones
force packing with LORAKIT_ONEDNN_FP32=1 and run wherever torch has oneDNN; the add_update tests run on
every host."""

from __future__ import annotations

import pytest
import torch
from conftest import build, logits, randomize_adapters
from torch import nn

import lorakit
from lorakit import packed, products
from lorakit.base import autocast
from lorakit.errors import UserError
from lorakit.generate import Sampling, stream_tokens
from lorakit.layers import LoraLayer
from lorakit.packed import PackedCopyLinear, PackedLinear, pack_for_inference

CPU = torch.device("cpu")
needs_onednn_bf16 = pytest.mark.skipif(not packed.supported(CPU, torch.bfloat16),
                                       reason="no AMX / AVX-512-BF16 (or oneDNN bf16) on this host")


def _bf16_model(family: str = "qwen2", adapters: bool = True) -> nn.Module:
    model = build(family).to(torch.bfloat16)
    if adapters:
        lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model)
    return model.eval()


def _run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), autocast(CPU, torch.bfloat16):
        return logits(model, ids)


@pytest.fixture
def no_fp32_route(monkeypatch):
    """Packed products only (the fp32 route for small weights is tested on its own)."""
    monkeypatch.setattr(packed, "fp32_rows", lambda weight, serving=False: 0)


@needs_onednn_bf16
@pytest.mark.parametrize("family", ["qwen2", "llama", "mlp"])
def test_packed_model_gives_the_same_logits_bit_for_bit(family, ids, no_fp32_route):
    model = _bf16_model(family)
    hooks = _hooked(model)  # the unpacked layers on the path the packed ones take (add_update)
    before = _run(model, ids)
    for hook in hooks:
        hook.remove()
    count = pack_for_inference(model)
    assert count > 0 and any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(not isinstance(layer.base, nn.Linear) for _, layer in lorakit.lora_layers(model)
               if layer.kind == "linear")
    assert torch.equal(_run(model, ids), before)
    with lorakit.disable_adapters(model):  # the base alone, through the packed weights
        base = _run(model, ids)
    assert not torch.equal(base, before)


@needs_onednn_bf16
def test_the_fp32_route_rounds_an_fp32_product_once(monkeypatch):
    monkeypatch.setattr(packed, "fp32_rows", lambda weight: 4)
    linear = nn.Linear(32, 48).to(torch.bfloat16)
    layer = PackedLinear(linear, fp32_rows=4)
    for rows in (1, 4, 5):
        x = torch.randn(rows, 32).to(torch.bfloat16)
        with torch.no_grad(), autocast(CPU, torch.bfloat16):  # autocast must not turn the fp32 route into bf16
            y = layer(x)
        if rows <= 4:
            expected = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        else:
            expected = torch.nn.functional.linear(x, linear.weight, linear.bias).float()
        assert y.dtype == torch.bfloat16 and torch.equal(y, expected.to(torch.bfloat16)), rows


@needs_onednn_bf16
def test_tied_heads_stay_and_packing_can_be_turned_off(monkeypatch, no_fp32_route):
    model = build("llama").to(torch.bfloat16).eval()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: packing would copy it
    pack_for_inference(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)
    monkeypatch.setenv(packed.ENV, "0")
    assert pack_for_inference(build("llama").to(torch.bfloat16)) == 0
    monkeypatch.setenv(packed.ENV, "yes")
    with pytest.raises(UserError, match="LORAKIT_PACKED_WEIGHTS"):
        pack_for_inference(build("llama").to(torch.bfloat16))


@pytest.mark.parametrize("vendor, flags, expected, serving", [("AuthenticAMD", {"avx2", "fma", "avx512f"}, True, True),
                                                              ("AuthenticAMD", {"avx2", "fma"}, True, False),
                                                              ("AuthenticAMD", {"sse4_2"}, False, False),
                                                              ("GenuineIntel", {"avx512f", "amx_bf16"}, False, False)])
def test_fp32_is_packed_where_fp32_products_go_to_onednn(monkeypatch, vendor, flags, expected, serving):
    monkeypatch.delenv(products.ENV, raising=False)
    monkeypatch.delenv(packed.ENV, raising=False)
    monkeypatch.setattr(products, "cpu_info", lambda: (vendor, frozenset(flags)))
    assert (pack_for_inference(build("llama")) > 0) == (expected and products.available())  # generate, eval
    assert (pack_for_inference(build("llama"), serving=True) > 0) == (serving and products.available())  # serve
    monkeypatch.setenv(products.ENV, "0")  # LORAKIT_ONEDNN_FP32 decides outright, as for training
    assert pack_for_inference(build("llama")) == 0
    assert pack_for_inference(build("llama"), serving=True) == 0
    monkeypatch.setenv(products.ENV, "1")
    assert pack_for_inference(build("llama")) == (15 if products.available() else 0)
    assert pack_for_inference(build("llama"), serving=True) == (15 if products.available() else 0)
    monkeypatch.setenv(packed.ENV, "0")  # and LORAKIT_PACKED_WEIGHTS=0 turns all packing off
    assert pack_for_inference(build("llama")) == 0


@pytest.mark.parametrize("flags, packs", [({"avx2", "fma", "avx512f"}, True), ({"avx2", "fma"}, False)])
def test_the_server_packs_fp32_weights_only_where_serving_prefers_onednn(monkeypatch, flags, packs):
    """`lorakit serve` asks for serving: on an AVX2-only AMD CPU it keeps plain Linear weights (its engine's
    transposed MKL product) where `generate` and `eval` pack them."""
    from lorakit.serve.app import build as build_server
    from lorakit.serve.config import ServeConfig

    monkeypatch.delenv(products.ENV, raising=False)
    monkeypatch.delenv(packed.ENV, raising=False)
    monkeypatch.setattr(products, "cpu_info", lambda: ("AuthenticAMD", frozenset(flags)))
    _, engine, _ = build_server(ServeConfig(dtype="fp32"), start=False)
    kinds = {type(m) for m in engine.model.modules()}
    assert (PackedLinear in kinds) == (packs and products.available())
    assert (nn.Linear in kinds) != (packs and products.available())


def test_bf16_is_not_packed_off_the_hardware(monkeypatch):
    monkeypatch.setattr("lorakit.base.cpu_flags_have_fast_bf16", lambda: False)
    assert pack_for_inference(build("llama").to(torch.bfloat16)) == 0


# -- fp32 (every host: LORAKIT_ONEDNN_FP32=1 packs wherever torch has oneDNN) -------------------------------

needs_onednn = pytest.mark.skipif(not products.available(), reason="this torch has no oneDNN")


@pytest.fixture
def fp32_packing(monkeypatch):
    monkeypatch.setenv(products.ENV, "1")
    monkeypatch.delenv(packed.ENV, raising=False)


def _tied(family: str = "llama") -> nn.Module:
    model = build(family)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@needs_onednn
@pytest.mark.parametrize("family", ["qwen2", "llama", "mlp"])
def test_fp32_packed_model_gives_the_logits_to_rounding_and_the_same_greedy_text(family, ids, fp32_packing):
    plain, model = build(family), build(family)
    for m in (plain, model):
        lorakit.inject(m, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(m)
    assert pack_for_inference(model) > 0
    layers = [layer for _, layer in lorakit.lora_layers(model) if layer.kind == "linear"]
    assert layers and all(isinstance(layer.base, PackedLinear) and layer.base.fp32 is None for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
        with lorakit.disable_adapters(model), lorakit.disable_adapters(plain):
            torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    if family != "mlp":
        sampling = Sampling(max_new_tokens=12, greedy=True)
        prompt = ids[0].tolist()
        assert list(stream_tokens(model, prompt, sampling, None)) == list(stream_tokens(plain, prompt, sampling, None))


@needs_onednn
def test_a_tied_fp32_head_multiplies_by_a_packed_copy_and_stays_tied(ids, fp32_packing):
    plain, model = _tied(), _tied()
    pack_for_inference(model)
    head = model.lm_head
    assert isinstance(head, PackedCopyLinear) and head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
        for m in (plain, model):  # written in place (through the embedding): the copy is packed again
            m.model.embed_tokens.weight.mul_(2)
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
        new = nn.Parameter(torch.randn_like(head.weight))
        plain.lm_head.weight = model.lm_head.weight = new  # replaced: so is the copy
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)


@needs_onednn
def test_an_adapter_on_a_tied_packed_head_merges_untied_and_unmerges_tied_back(ids, fp32_packing):
    plain, model = _tied(), _tied()
    pack_for_inference(model)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    for m in (plain, model):
        lorakit.inject(m, config)
        randomize_adapters(m)
    assert isinstance(model.lm_head.base, PackedCopyLinear)
    embedding = model.model.embed_tokens.weight.clone()
    with torch.no_grad():
        unmerged = logits(model, ids)
        lorakit.merge(model)
        lorakit.merge(plain)
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-4)
        assert torch.equal(model.model.embed_tokens.weight, embedding)  # the merge went to the head's own copy
        lorakit.unmerge(model)
        assert model.lm_head.base.weight is model.model.embed_tokens.weight  # tied again, exactly as it was
        torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adapter_wrapped_around_a_packed_layer_later_keeps_the_models_mode(ids, dtype, fp32_packing):
    """A server packs at startup and loads adapters later: their dropout must be off in an eval model."""
    model = build("llama").to(dtype).eval()
    if not pack_for_inference(model):
        pytest.skip("no packing of this precision here")
    assert not any(m.training for m in model.modules())
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear"))
    randomize_adapters(model)
    with torch.no_grad():
        assert torch.equal(logits(model, ids), logits(model, ids))


@needs_onednn
def test_a_packed_copy_follows_a_merge_in_inference_mode_and_a_new_storage(ids, fp32_packing):
    plain, model = _tied(), _tied()
    pack_for_inference(model)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])
    for m in (plain, model):
        lorakit.inject(m, config)
        randomize_adapters(m)
    with torch.inference_mode():
        lorakit.merge(model)
        lorakit.merge(plain)
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    with torch.no_grad():
        lorakit.unmerge(model)
        lorakit.unmerge(plain)
        for m in (plain, model):  # the same Parameter, another storage: no version bump
            m.model.embed_tokens.weight.data = m.model.embed_tokens.weight.data * 3
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)


@needs_onednn
def test_a_packed_copy_takes_the_plain_product_where_a_gradient_or_autocast_needs_it(fp32_packing):
    linear = nn.Linear(16, 8)
    layer = PackedCopyLinear(linear)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert linear.weight.grad is not None and x.grad is not None and layer._packed is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-6)
    assert layer._packed is not None


@needs_onednn_bf16
def test_adapters_load_onto_packed_layers_merge_and_unmerge(ids, no_fp32_route):
    plain, model = _bf16_model(adapters=False), _bf16_model(adapters=False)
    pack_for_inference(model)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    for m in (plain, model):  # an adapter injected after packing wraps the packed layer
        lorakit.inject(m, config)
        randomize_adapters(m)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer) and isinstance(layer.base, PackedLinear)
    unmerged = _run(model, ids)
    torch.testing.assert_close(unmerged, _run(plain, ids), atol=2e-2, rtol=2e-2)  # bf16 roundings differ
    version = layer.base.version
    lorakit.merge(model)
    lorakit.merge(plain)
    assert layer.base.version == version + 1
    assert torch.equal(_run(model, ids), _run(plain, ids))  # the same rounded weights, packed or not
    lorakit.unmerge(model)
    torch.testing.assert_close(_run(model, ids), unmerged, atol=2e-2, rtol=2e-2)


@needs_onednn_bf16
def test_an_input_gradient_goes_through_the_dense_weight():
    linear = nn.Linear(16, 8).to(torch.bfloat16)
    layer = PackedLinear(linear)
    x = torch.randn(3, 16).to(torch.bfloat16).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    layer(x).sum().backward()
    linear(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(layer.weight, linear.weight)


# -- the few-row inference path of add_update (every host) -------------------------------------------------


def _hooked(model: nn.Module) -> list:
    """A forward hook on every base Linear: LoRA layers then take `add_update`, not the fused path."""
    return [layer.base.register_forward_hook(lambda module, args, out: None) for _, layer in lorakit.lora_layers(model)]


@pytest.mark.parametrize("rows", [1, 3])
def test_few_row_inference_adds_the_fp32_update_into_the_bf16_output_once(rows):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48)).to(torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    randomize_adapters(model)
    _hooked(model)
    layer = model[0]
    x = torch.randn(rows, 32).to(torch.bfloat16)
    with torch.no_grad(), autocast(CPU, torch.bfloat16):
        y = model(x)
        base = layer.base(x)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    update = (x.float() @ A.t() * layer.scaling["default"]) @ B.t()
    assert torch.equal(y, base.add_(update))
    assert y.dtype == torch.bfloat16


def test_with_gradients_or_many_rows_the_update_stays_on_the_autocast_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48)).to(torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    randomize_adapters(model)
    _hooked(model)
    x = torch.randn(80, 32).to(torch.bfloat16)  # more rows than FEW_ROWS: the bf16 products
    with autocast(CPU, torch.bfloat16):
        y = model(x)  # gradients on: the adapters train through the autocast path
    y.float().sum().backward()
    assert model[0].lora_A["default"].grad is not None
    with torch.no_grad(), autocast(CPU, torch.bfloat16):
        assert torch.equal(model(x), y.detach())


def test_a_hook_that_keeps_the_base_output_does_not_see_the_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48)).to(torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    randomize_adapters(model)
    kept = []
    model[0].base.register_forward_hook(lambda module, args, out: kept.append(out))
    x = torch.randn(2, 32).to(torch.bfloat16)
    with torch.no_grad(), autocast(CPU, torch.bfloat16):
        y = model(x)
        assert torch.equal(kept[0], model[0].base(x)) and not torch.equal(y, kept[0])


@needs_onednn_bf16
def test_zero_rows_and_trainable_token_heads(ids, no_fp32_route):
    layer = PackedLinear(nn.Linear(32, 48).to(torch.bfloat16))
    assert layer(torch.zeros(0, 32, dtype=torch.bfloat16)).shape == (0, 48)
    model = build("llama").to(torch.bfloat16).eval()
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 5]})
    lorakit.inject(model, config)
    pack_for_inference(model)
    assert type(model.lm_head.base) is nn.Linear  # a trainable-token head writes its weight: it stays as it is
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, PackedLinear)


def test_small_weights_take_fp32_for_one_row_by_size_not_by_timing(monkeypatch):
    bf16 = torch.bfloat16
    monkeypatch.setenv(products.ENV, "1")  # where fp32 products go to oneDNN: no copies, their BLAS is slow
    assert packed.fp32_rows(torch.empty(704, 256, dtype=bf16)) == 0
    monkeypatch.setenv(products.ENV, "0")
    assert packed.fp32_rows(torch.empty(704, 256, dtype=bf16)) == packed.FP32_ROWS == 1  # the embedded base's MLP
    assert packed.fp32_rows(torch.empty(128, 896, dtype=bf16)) == 1  # a 0.5B model's key / value projection
    assert packed.fp32_rows(torch.empty(896, 896, dtype=bf16)) == 0  # bigger: always packed
    assert packed.fp32_rows(torch.empty(packed.SMALL_WEIGHT + 1, 1, dtype=bf16)) == 0
    assert packed.fp32_rows(torch.empty(704, 256)) == 0  # an fp32 weight: always packed, no copy
