"""causal_lm_loss against the oracle it replaces: transformers' own `model(**batch).loss`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, build
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.losses import CHUNK_ELEMENTS, IGNORE, MIN_ROWS, LinearCrossEntropy, _rows, causal_lm_loss


def _tied_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True))


MODELS = {"llama": lambda: build("llama"), "llama-tied": _tied_llama, "qwen2": lambda: build("qwen2"),
          "gpt2": lambda: build("gpt2")}


def _batch(padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if padded:
        mask[1, 9:] = 0  # right padding
        labels[1, 9:] = IGNORE
        labels[2, :4] = IGNORE  # a prompt without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_elements", [1 << 21, 5 * VOCAB])  # one chunk; several (5 rows each)
@pytest.mark.parametrize("family", list(MODELS))
def test_value_and_gradients_equal_transformers_loss(family, chunk_elements):
    model = lorakit.inject(MODELS[family](), lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    twin = copy.deepcopy(model)
    batch = _batch()
    torch.manual_seed(1)  # GPT-2 has dropout in training mode: the same draws for both
    ours = causal_lm_loss(model, batch, chunk_elements=chunk_elements)
    torch.manual_seed(1)
    theirs = twin(**batch).loss
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    theirs.backward()
    got, want = _lora_grads(model), _lora_grads(twin)
    assert got.keys() == want.keys() and got
    for name in got:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name


def test_unpadded_batch_and_plain_model():
    model = build("qwen2")
    batch = _batch(padded=False)
    assert torch.allclose(causal_lm_loss(model, batch), model(**batch).loss, atol=1e-5, rtol=1e-5)


def test_trainable_head_gets_the_same_gradients():
    model, twin = build("llama"), build("llama")
    model.requires_grad_(False)
    twin.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    twin.lm_head.weight.requires_grad_(True)
    batch = _batch()
    causal_lm_loss(model, batch, chunk_elements=4 * VOCAB).backward()
    twin(**batch).loss.backward()
    assert torch.allclose(model.lm_head.weight.grad, twin.lm_head.weight.grad, atol=1e-6, rtol=1e-4)


# a DoRA or lora_bias head is not W + s·B·A: it takes the model's path, with the same loss and gradients
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["llama", "llama-tied", "gpt2"])
def test_head_with_an_adapter_gets_the_same_loss_and_gradients(family, variant):
    """The head's weight plus its adapter's update is one (V, d) matrix: same loss, same adapter gradients."""
    config = lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=["lm_head", "q_proj", "c_attn"], init_lora_weights=False,
                                **VARIANTS[variant])
    model = lorakit.inject(MODELS[family](), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # magnitudes away from ‖W + s·B·A‖ and biases away from zero, so that they count
        for _, layer in lorakit.lora_layers(model):
            for p in (*layer.lora_magnitude.values(), *layer.lora_bias.values()):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()  # GPT-2's own dropout off: both sides see the same activations
    twin = copy.deepcopy(model)
    batch = _batch()
    ours, theirs = causal_lm_loss(model, batch, chunk_elements=4 * VOCAB), twin(**batch).loss
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.backward()
    theirs.backward()
    got, want = _lora_grads(model), _lora_grads(twin)
    assert any("lm_head" in name for name in got) and got.keys() == want.keys()
    for name in got:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name


def test_head_adapter_with_dropout_falls_back_to_the_model_loss():
    model = lorakit.inject(build("llama"), lorakit.LoraConfig(r=2, target_modules=["lm_head"], lora_dropout=0.5))
    model.train()
    batch = _batch()
    torch.manual_seed(3)
    ours = causal_lm_loss(model, batch)
    torch.manual_seed(3)
    assert torch.equal(ours, model(**batch).loss)  # the same dropout draws: the very same path


def test_function_gradcheck_with_bias_in_float64():
    torch.manual_seed(0)
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, IGNORE, 5, 0, IGNORE, 2, 3])
    assert torch.autograd.gradcheck(lambda h, W, b: LinearCrossEntropy.apply(h, W, b, t, 2), (h, W, b))
    expected = torch.nn.functional.cross_entropy(h @ W.t() + b, t, ignore_index=IGNORE)
    assert torch.allclose(LinearCrossEntropy.apply(h, W, b, t, 3), expected)


@pytest.mark.parametrize(("chunk_elements", "vocab", "rows"), [
    (None, 151_936, MIN_ROWS),  # a big vocabulary: the floor, not 13 rows that re-read the head 158 times
    (None, 1000, CHUNK_ELEMENTS // 1000),  # a small one: the element budget
    (5 * 1000, 1000, 5),  # a given bound is kept, down to one row
    (10, 1000, 1),
])
def test_rows_per_chunk(chunk_elements, vocab, rows):
    assert _rows(chunk_elements, vocab) == rows
