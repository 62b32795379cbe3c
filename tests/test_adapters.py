"""Adapters over a whole model (`lorakit.adapters`): inject, disable, merge, unload, delete, targets, counts."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, build, logits, randomize_adapters
from torch import nn

import lorakit
from lorakit.layers import LoraLayer

FAMILY_NAMES = list(FAMILIES)


def _config(family: str, **kw) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=FAMILIES[family][1], **kw)


def _injected(family: str, **kw) -> tuple[nn.Module, nn.Module]:
    base = build(family)
    model = lorakit.inject(copy.deepcopy(base), _config(family, **kw))
    return base, model


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_injected_model_equals_base_at_init(family, ids):
    base, model = _injected(family)
    assert torch.equal(logits(model, ids), logits(base, ids))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_disabled_adapter_is_base_bit_exactly(family, ids):
    base, model = _injected(family)
    randomize_adapters(model)
    assert not torch.allclose(logits(model, ids), logits(base, ids))
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(base, ids))
    assert not torch.allclose(logits(model, ids), logits(base, ids))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_only_adapter_parameters_get_gradients(family, ids):
    _, model = _injected(family)
    model.train()
    randomize_adapters(model)
    logits(model, ids).float().pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merged_equals_unmerged_and_unmerge_restores(family, ids):
    _, model = _injected(family)
    randomize_adapters(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    unmerged = logits(model, ids)
    lorakit.merge(model)
    assert all(layer.merged for _, layer in lorakit.lora_layers(model))
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6, rtol=0), n


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unload_without_merge_gives_base_back_exactly(family, ids):
    base, model = _injected(family)
    randomize_adapters(model)
    plain = lorakit.unload(model, merge=False)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert plain.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in base.state_dict().items())
    assert torch.equal(logits(plain, ids), logits(base, ids))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unload_with_merge_keeps_outputs(family, ids):
    _, model = _injected(family)
    randomize_adapters(model)
    adapted = logits(model, ids)
    plain = lorakit.unload(model, merge=True)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert torch.allclose(logits(plain, ids), adapted, atol=1e-5, rtol=0)


def _tied(family: str, targets: list[str]) -> nn.Module:
    model = build(family)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model = lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_adapters(model, scale=0.3)
    return model


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "lm_head"]), ("llama", ["embed_tokens"]),
                                            ("gpt2", ["c_attn", "lm_head"])])
def test_merging_into_a_tied_weight_unties_it_and_unmerge_ties_it_back(family, targets, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tied(family, targets)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    shared = (embedding.base if isinstance(embedding, LoraLayer) else embedding).weight
    original = shared.clone()
    unmerged = logits(model, ids)
    lorakit.merge(model)
    # the adapted module computes what it did unmerged; the module it shared a weight with is unchanged
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    assert torch.equal(shared, original) and model.config.tie_word_embeddings is False
    lorakit.unmerge(model)
    assert model.config.tie_word_embeddings is True
    for module in (embedding, head):
        assert (module.base if isinstance(module, LoraLayer) else module).weight is shared
    assert torch.equal(shared, original)  # tied back exactly (the other layers' unmerge is subtraction)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    plain = lorakit.unload(model, merge=True)
    plain.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.allclose(logits(again, ids), unmerged, atol=1e-5, rtol=0)


def test_a_merge_that_does_not_write_the_tied_head_leaves_it_tied(ids):
    model = _tied("llama", ["lm_head"])  # the head's adapter is not the active one: nothing merges into it
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="other")
    lorakit.merge(model)
    assert model.lm_head.base.weight is model.get_input_embeddings().weight and model.config.tie_word_embeddings
    lorakit.delete_adapter(model, "default")  # the head's wrapper goes; its base must still be the shared weight
    lorakit.unmerge(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight and model.config.tie_word_embeddings
    plain = lorakit.unload(model, merge=True)
    assert plain.lm_head.weight is plain.get_input_embeddings().weight and plain.config.tie_word_embeddings


def test_unmerge_gives_the_config_back_as_it_was():
    model = build("llama")  # its config says untied; the weight is shared by hand
    model.lm_head.weight = model.model.embed_tokens.weight
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    randomize_adapters(model)
    before = model.config.to_dict()
    lorakit.merge(model)
    assert model.lm_head.base.weight is not model.model.embed_tokens.weight
    lorakit.unmerge(model)
    assert model.lm_head.base.weight is model.model.embed_tokens.weight and model.config.to_dict() == before


def test_a_failed_merge_leaves_a_tied_model_tied(ids):
    model = _tied("llama", ["q_proj", "lm_head"])
    head = model.get_output_embeddings()
    head.lora_bias["default"] = nn.Parameter(torch.ones(head.out_features))  # the head has no bias: refused
    with pytest.raises(lorakit.UserError, match="lora_bias"):
        lorakit.merge(model)
    assert head.base.weight is model.get_input_embeddings().weight and model.config.tie_word_embeddings is True
    assert not any(layer.merged for _, layer in lorakit.lora_layers(model))


# -- the math against an explicit oracle ----------------------------------------------------------


def test_delete_adapter_returns_plain_layers(ids):
    base = build("llama")
    model = lorakit.inject(copy.deepcopy(base), _config("llama"))
    randomize_adapters(model)
    lorakit.delete_adapter(model, "default")
    assert not list(lorakit.lora_layers(model))
    assert torch.equal(logits(model, ids), logits(base, ids))


def test_modules_to_save_trains_a_copy_and_disable_uses_original(ids):
    base = build("llama")
    model = lorakit.inject(copy.deepcopy(base), _config("llama", modules_to_save=["lm_head"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "lm_head.copies.default.weight" in trainable
    with torch.no_grad():
        model.lm_head.copies["default"].weight.add_(0.5)
    assert not torch.allclose(logits(model, ids), logits(base, ids))
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(base, ids))


def test_bias_modes_choose_trainable_biases():
    counts = {}
    for bias in ("none", "lora_only", "all"):
        model = build("gpt2")
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"], bias=bias))
        counts[bias] = sorted(n for n, p in model.named_parameters() if p.requires_grad and "bias" in n)
    assert counts["none"] == []
    assert counts["lora_only"] == ["transformer.h.0.attn.c_attn.base.bias", "transformer.h.1.attn.c_attn.base.bias"]
    assert set(counts["lora_only"]) < set(counts["all"]) and "transformer.ln_f.bias" in counts["all"]


def test_target_matching_rules():
    model = build("llama")
    cases = {
        "suffix list": (["q_proj"], 2),
        "regex": (r"model\.layers\.1\.self_attn\.(q|k)_proj", 2),
        "all-linear skips the head": ("all-linear", 14),
    }
    for label, (targets, n) in cases.items():
        m = copy.deepcopy(model)
        lorakit.inject(m, lorakit.LoraConfig(target_modules=targets))
        names = [name for name, _ in lorakit.lora_layers(m)]
        assert len(names) == n, label
        assert "lm_head" not in names
    for family, body in (("llama", 14), ("gpt2", 8)):  # all-linear+head: the same layers and the output head
        m = build(family)
        config = lorakit.LoraConfig(target_modules="all-linear+head")
        lorakit.inject(m, config)
        lorakit.inject(m, lorakit.LoraConfig(target_modules="all-linear+head"), adapter="second")
        names = [name for name, _ in lorakit.lora_layers(m)]
        assert len(names) == body + 1 and names[-1] == "lm_head", family
        assert "lm_head" in config.target_modules  # recorded as names, as PEFT writes all-linear
    m = copy.deepcopy(model)
    lorakit.inject(m, lorakit.LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                          layers_pattern="layers", exclude_modules=["v_proj"]))
    assert [n for n, _ in lorakit.lora_layers(m)] == ["model.layers.1.self_attn.q_proj"]


def test_trainable_parameter_count():
    model = build("mlp")
    total = sum(p.numel() for p in model.parameters())
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["up"]))
    count = lorakit.trainable_parameters(model)
    assert count.trainable == 2 * 24 + 48 * 2
    assert count.total == total + count.trainable
    assert f"{count.trainable:,}" in str(count) and count.percent == pytest.approx(100 * count.trainable / count.total)


