"""Trainable token rows (PEFT's trainable_token_indices): PEFT interop both ways, merge, disable, delete,
tied heads, and files that do not fit."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import VOCAB, build, logits, perturb_trainables
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.io import WEIGHTS_NAME
from lorakit.tokens import TokenLayer

EMBED = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _tied_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)).eval()


BASES = {"llama": lambda: build("llama"), "llama tied": _tied_llama, "gpt2": lambda: build("gpt2")}

# name -> (base, LoraConfig kwargs); each runs both ways against PEFT.
CASES = {
    "list, untied": ("llama", dict(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
    "list, tied head takes the rows": ("llama tied", dict(r=2, target_modules=["q_proj"],
                                                          trainable_token_indices=[3, 5, 7])),
    "dict, head and embedding": ("llama", dict(r=2, target_modules=["v_proj"],
                                               trainable_token_indices={"lm_head": [1, 2], "embed_tokens": [3]})),
    "dict, tied, same ids": ("llama tied", dict(r=2, target_modules=["q_proj"],
                                                trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [3, 5]})),
    "dict, tied, own ids": ("llama tied", dict(r=2, target_modules=["q_proj"],
                                               trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [4]})),
    "gpt2 tied": ("gpt2", dict(r=2, target_modules=["c_attn"], trainable_token_indices=[3, 5])),
}


@pytest.fixture
def ids() -> torch.Tensor:
    """Random ids with the trained ones among them."""
    out = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(1))
    out[0, :5] = torch.tensor([1, 2, 3, 5, 7])
    return out


def _peft_saved(case, path):
    """(the base, the PEFT model that saved `case` with perturbed weights into `path`)."""
    base_name, kw = CASES[case]
    base = BASES[base_name]()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    perturb_trainables(ref)
    ref.eval()
    ref.save_pretrained(path)
    return base, ref


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_rows_load_with_same_logits(case, ids, tmp_path):
    base, ref = _peft_saved(case, tmp_path)
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path)
    assert (logits(model, ids) - ref(input_ids=ids).logits).abs().max() <= 1e-6
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-2  # the rows do change the result


@pytest.mark.parametrize("case", CASES)
def test_lorakit_saved_rows_load_in_peft_with_same_logits(case, ids, tmp_path):
    base_name, kw = CASES[case]
    base = BASES[base_name]()
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    perturb_trainables(model)
    lorakit.save_adapter(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (ref(input_ids=ids).logits - logits(model, ids)).abs().max() <= 1e-6


@pytest.mark.parametrize("case", CASES)
def test_resave_is_bit_exact_in_peft_layout(case, ids, tmp_path):
    base, _ = _peft_saved(case, tmp_path / "peft")
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "peft")
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs, ours = load_file(tmp_path / "peft" / WEIGHTS_NAME), load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    field = [json.loads((tmp_path / d / "adapter_config.json").read_text())["trainable_token_indices"]
             for d in ("peft", "ours")]
    assert field[0] == field[1] == CASES[case][1]["trainable_token_indices"]
    again = copy.deepcopy(base)
    lorakit.load_adapter(again, tmp_path / "ours")
    assert torch.equal(logits(again, ids), logits(model, ids))


@pytest.mark.parametrize("case", CASES)
def test_merged_equals_unmerged_and_disabled_is_base(case, ids, tmp_path):
    base, _ = _peft_saved(case, tmp_path)
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path)
    adapted, plain = logits(model, ids), logits(base, ids)
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model, ids), plain)
    embedding = model.get_input_embeddings()
    before = embedding.base.weight.clone()
    lorakit.merge(model)
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5
    with lorakit.disable_adapters(model):  # takes the merged rows out and back
        assert (logits(model, ids) - plain).abs().max() <= 1e-5
    lorakit.unmerge(model)
    assert torch.equal(embedding.base.weight, before)  # rows restored bit for bit
    tied = getattr(base.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    assert (getattr(head, "base", head).weight is embedding.base.weight) == tied
    assert model.config.tie_word_embeddings == tied
    merged = lorakit.unload(model, merge=True)
    assert (logits(merged, ids) - adapted).abs().max() <= 1e-5
    assert not any(isinstance(m, TokenLayer) for m in merged.modules())


def test_delete_and_switching_adapters_give_the_base_rows_back(ids, tmp_path):
    base, _ = _peft_saved("list, tied head takes the rows", tmp_path / "rows")
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"]), adapter="other")
    only_other = logits(model, ids)
    lorakit.load_adapter(model, tmp_path / "rows", adapter="rows")
    lorakit.set_adapters(model, "other")
    assert torch.equal(logits(model, ids), only_other)
    lorakit.set_adapters(model, "rows")
    lorakit.delete_adapter(model, "rows")
    assert not any(isinstance(m, TokenLayer) for m in model.modules())
    lorakit.set_adapters(model, "other")
    assert torch.equal(logits(model, ids), only_other)


def test_new_rows_start_as_the_base_and_train():
    model = lorakit.inject(_tied_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"],
                                                             trainable_token_indices=[3, 5]))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = embedding.values["default"]
    assert rows.requires_grad and head.values["default"] is rows  # the tied head shares, not copies
    assert torch.equal(rows, embedding.base.weight[[3, 5]])
    model(torch.tensor([[3, 1, 5]])).logits.sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert lorakit.trainable_parameters(model).trainable == sum(
        p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


# -- what does not fit --------------------------------------------------------------------------------


def _edit_config(**fields):
    def edit(path):
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**data, **fields}))
    return edit


def _edit_rows(change):
    def edit(path):
        tensors = load_file(path / WEIGHTS_NAME)
        save_file(change(tensors), path / WEIGHTS_NAME)
    return edit


HOSTILE = {
    "id past the vocabulary": (_edit_config(trainable_token_indices=[3, 5, VOCAB]), "past the 97 rows"),
    "negative id": (_edit_config(trainable_token_indices=[3, -5, 7]), "token ids"),
    "repeated id": (_edit_config(trainable_token_indices=[3, 3, 7]), "twice"),
    "ids not a list": (_edit_config(trainable_token_indices="3,5"), "list of token ids"),
    "unknown module": (_edit_config(trainable_token_indices={"wte": [3]}), "matches no module"),
    "not a token layer": (_edit_config(trainable_token_indices={"norm": [3]}), "Embedding or a Linear"),
    "module named twice": (_edit_config(trainable_token_indices={"embed_tokens": [3, 5, 7],
                                                                 "model.embed_tokens": [4, 6, 8]}), "two keys"),
    "lora on the same module": (_edit_config(trainable_token_indices={"q_proj": [3]}), "one module takes one"),
    "rows lost": (_edit_rows(lambda t: {k: v for k, v in t.items() if k != EMBED}), "lacks"),
    "too few rows": (_edit_rows(lambda t: {**t, EMBED: t[EMBED][:2]}), r"\(2, 32\)"),
    "rows too wide": (_edit_rows(lambda t: {**t, EMBED: torch.zeros(3, 33)}), r"\(3, 33\)"),
    "rows not named": (_edit_config(trainable_token_indices=None), "trainable_token_indices is not set"),
    "nan rows": (_edit_rows(lambda t: {**t, EMBED: t[EMBED] * float("nan")}), "NaN"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_rows_that_do_not_fit_fail_clearly_and_leave_the_model_unchanged(case, ids, tmp_path):
    damage, message = HOSTILE[case]
    base, _ = _peft_saved("list, untied", tmp_path)
    damage(tmp_path)
    model = copy.deepcopy(base)
    before = logits(model, ids)
    with pytest.raises(lorakit.UserError, match=message) as err:
        lorakit.load_adapter(model, tmp_path)
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, (TokenLayer, lorakit.LoraLayer)) for m in model.modules())
    assert torch.equal(logits(model, ids), before)


def test_lora_on_a_tied_head_with_the_embeddings_rows_is_refused_by_name(tmp_path):
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], trainable_token_indices=[3])
    with pytest.raises(lorakit.UserError, match="'lm_head' is tied to the input embedding.*with PEFT"):
        lorakit.inject(_tied_llama(), config)


def test_per_row_routing_refuses_rows(tmp_path):
    model = lorakit.inject(build("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"],
                                                              trainable_token_indices=[3]))
    with pytest.raises(lorakit.UserError, match="per-row"):
        with lorakit.per_row_adapters(model, ["default", None]):
            pass
