"""`LoraConfig`: PEFT's fields and JSON, per-module rank and scale."""

from __future__ import annotations

import json
import time

import pytest
from conftest import build

import lorakit
from lorakit.config import CONFIG_NAME, LoraConfig


def test_json_round_trip_keeps_every_field_and_writes_peft_layout(tmp_path):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05,
                        rank_pattern={"v_proj": 4}, base_model_name_or_path="lorakit/embedded")
    config.save(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 8 and data["target_modules"] == ["q_proj", "v_proj"]
    assert data["use_dora"] is False and data["use_qalora"] is False  # features off are written, as PEFT does
    assert LoraConfig.load(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 8), (True, 16 / 8 ** 0.5)])
def test_scaling_is_alpha_over_r_or_its_root(rslora, expected):
    assert LoraConfig(r=8, lora_alpha=16, use_rslora=rslora).scaling_for("model.layers.0.q_proj") == expected


def test_patterns_match_a_dotted_suffix_of_the_module_name():
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.11.self_attn.q_proj") == 4  # '1' is not a suffix of '11'
    assert config.alpha_for("model.layers.0.self_attn.v_proj") == 3
    assert config.alpha_for("model.layers.0.self_attn.xv_proj") == 8


def test_rank_and_alpha_patterns():
    model = build("llama")
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    lorakit.inject(model, config)
    layers = dict(lorakit.lora_layers(model))
    assert layers["model.layers.1.self_attn.q_proj"].rank("default") == 2
    assert layers["model.layers.0.self_attn.q_proj"].rank("default") == 4
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == pytest.approx(3 / 4)
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == pytest.approx(8 / 2)


def test_a_repeated_token_id_in_a_long_list_is_found_at_once():
    ids = [*range(40_000), 39_999]  # a hostile adapter_config.json: a search per id took ~20 s here (quadratic)
    start = time.perf_counter()
    with pytest.raises(lorakit.UserError, match="token id 39999 twice"):
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=ids)
    assert time.perf_counter() - start < 2
