"""Adapters on disk: round-trips, PEFT interop both ways, and bad files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import build, logits, perturb_trainables, randomize_adapters
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.io import WEIGHTS_NAME, parse_adapter_spec

# name -> (family, LoraConfig kwargs); each runs in both directions against PEFT.
INTEROP_CASES = {
    "llama q,v": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})),
    "rslora": ("qwen2", dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True)),
    "qwen2 lora_only bias": ("qwen2", dict(r=2, target_modules=["q_proj", "k_proj"], bias="lora_only")),
    "gpt2 conv1d bias all": ("gpt2", dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], bias="all",
                                          fan_in_fan_out=True)),
    "embedding": ("llama", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"])),
    # GPT-2 ties its head to the embedding: an adapter on each, the shared weight itself untouched
    "tied head + embedding": ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "wte", "lm_head"])),
    "modules_to_save": ("llama", dict(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "regex + layers": ("llama", dict(r=2, target_modules=r".*\.(q|v)_proj", lora_dropout=0.1)),
    "layers_to_transform": ("llama", dict(r=2, target_modules=["q_proj"], layers_to_transform=[1],
                                          layers_pattern="layers")),
}


@pytest.mark.parametrize("case", INTEROP_CASES)
def test_peft_saved_adapter_loads_with_same_logits(case, ids, tmp_path):
    family, kw = INTEROP_CASES[case]
    base = build(family)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    perturb_trainables(ref)
    ref.eval()
    ref.save_pretrained(tmp_path)
    expected = ref(input_ids=ids).logits

    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path)
    assert torch.allclose(logits(model, ids), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", INTEROP_CASES)
def test_lorakit_saved_adapter_loads_in_peft_with_same_logits(case, ids, tmp_path):
    family, kw = INTEROP_CASES[case]
    base = build(family)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    perturb_trainables(model)
    lorakit.save_adapter(model, tmp_path)
    ours = logits(model, ids)

    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ref.eval()
    assert torch.allclose(ref(input_ids=ids).logits, ours, atol=1e-6, rtol=0)


def test_save_load_round_trip_is_bit_exact(ids, tmp_path):
    base = build("llama")
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules="all-linear",
                                                                  rank_pattern={"o_proj": 2}))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    saved = lorakit.adapter_state_dict(model)
    on_disk = load_file(tmp_path / WEIGHTS_NAME)
    assert on_disk.keys() == saved.keys()
    assert all(torch.equal(on_disk[k], v) for k, v in saved.items())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in on_disk

    loaded = copy.deepcopy(base)
    lorakit.load_adapter(loaded, tmp_path, adapter="again")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["rank_pattern"] == {"o_proj": 2}
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                               "up_proj", "v_proj"]


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    model = lorakit.inject(build("mlp"), lorakit.LoraConfig(target_modules=["up"]))
    lorakit.save_adapter(model, tmp_path)
    frozen, trainable = build("mlp"), build("mlp")
    lorakit.load_adapter(frozen, tmp_path)
    lorakit.load_adapter(trainable, tmp_path, trainable=True)
    assert lorakit.trainable_parameters(frozen).trainable == 0
    assert lorakit.trainable_parameters(trainable).trainable > 0


def test_merged_unloaded_model_saves_and_reloads_with_transformers(ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = lorakit.inject(build("llama"), lorakit.LoraConfig(target_modules="all-linear"))
    randomize_adapters(model)
    adapted = logits(model, ids)
    plain = lorakit.unload(model, merge=True)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.allclose(reloaded(ids).logits, adapted, atol=1e-5, rtol=0)


def test_unknown_json_fields_are_kept(tmp_path):
    model = lorakit.inject(build("mlp"), lorakit.LoraConfig(target_modules=["up"]))
    lorakit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["some_future_field"] = {"x": 1}
    path.write_text(json.dumps(data))
    config, _ = lorakit.read_adapter(tmp_path)
    assert config.to_dict()["some_future_field"] == {"x": 1}


# -- bad input ------------------------------------------------------------------------------------


def _saved(tmp_path, family="llama", **kw):
    model = lorakit.inject(build(family), lorakit.LoraConfig(**{"target_modules": ["q_proj"], **kw}))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    return tmp_path


def _break_config(path, **fields):
    data = json.loads((path / "adapter_config.json").read_text())
    data.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(data))


BAD_FILES = {
    "truncated weights": (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:-9]),
                          "not a readable safetensors"),
    "garbage weights": (lambda p: (p / WEIGHTS_NAME).write_bytes(b"\x00" * 40), "not a readable safetensors"),
    "missing config": (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json"),
    "config not json": (lambda p: (p / "adapter_config.json").write_text("{r: 8"), "not valid JSON"),
    "pickle only": (lambda p: ((p / WEIGHTS_NAME).unlink(), (p / "adapter_model.bin").write_bytes(b"x")),
                    "pickle"),
    "nan": (lambda p: save_file({k: v * float("nan") for k, v in load_file(p / WEIGHTS_NAME).items()},
                                p / WEIGHTS_NAME), "NaN or Inf"),
    "dora without magnitudes": (lambda p: _break_config(p, use_dora=True), "lora_magnitude_vector"),
    "other peft type": (lambda p: _break_config(p, peft_type="IA3"), "peft_type"),
    "lost tensor": (lambda p: save_file(dict(list(load_file(p / WEIGHTS_NAME).items())[1:]), p / WEIGHTS_NAME),
                    "lacks"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_adapter_files_fail_clearly_and_leave_model_unchanged(case, tmp_path, ids):
    damage, message = BAD_FILES[case]
    damage(_saved(tmp_path))
    model = build("llama")
    before = logits(model, ids)
    with pytest.raises(lorakit.UserError, match=message):
        lorakit.load_adapter(model, tmp_path)
    assert not list(lorakit.lora_layers(model))
    assert torch.equal(logits(model, ids), before)


def test_wrong_base_names_module_and_both_shapes(tmp_path):
    _saved(tmp_path)  # llama with hidden size 32, r=8 on q_proj
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(lorakit.UserError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(8, 32\).*\(8, 48\)") as err:
        lorakit.load_adapter(wide, tmp_path)
    assert "different base" in str(err.value)
    with pytest.raises(lorakit.UserError, match="matches no module"):
        lorakit.load_adapter(build("gpt2"), tmp_path)


CONFIG_ERRORS = {
    "r zero": (dict(r=0), "r must be a positive integer"),
    "alpha negative": (dict(lora_alpha=-1), "lora_alpha"),
    "dropout one": (dict(lora_dropout=1.0), "lora_dropout"),
    "empty targets": (dict(target_modules=[]), "target_modules is empty"),
    "bad bias": (dict(bias="some"), "bias must be"),
    "bad init": (dict(init_lora_weights="pissa_niter_0"), "init_lora_weights"),
    "bad rank pattern": (dict(rank_pattern={"q": 0}), "rank_pattern"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_invalid_config_fails_at_construction(case):
    kwargs, message = CONFIG_ERRORS[case]
    with pytest.raises(lorakit.UserError, match=message):
        lorakit.LoraConfig(**kwargs)


def test_no_match_lists_existing_names():
    with pytest.raises(lorakit.UserError, match="q_proj.*v_proj|k_proj"):
        lorakit.inject(build("llama"), lorakit.LoraConfig(target_modules=["query"]))


def test_interrupted_save_keeps_previous_files(tmp_path, monkeypatch):
    model = lorakit.inject(build("mlp"), lorakit.LoraConfig(target_modules=["up"]))
    lorakit.save_adapter(model, tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    randomize_adapters(model)

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr("lorakit.files.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", WEIGHTS_NAME]


@pytest.mark.parametrize("spec, expected", [("a/b:0.5", (Path("a/b"), 0.5)), ("a/b", (Path("a/b"), 1.0)),
                                            ("c:\\x", (Path("c:\\x"), 1.0))])
def test_adapter_specs(spec, expected):
    assert parse_adapter_spec(spec) == expected
