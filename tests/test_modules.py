"""Name matching, the targets parser, module replacement by dotted name, the output head."""

from __future__ import annotations

import pytest
from conftest import build
from torch import nn

from lorakit.modules import matches, output_head, parse_names, set_module


@pytest.mark.parametrize("names, key, expected", [
    (["q_proj"], "model.layers.0.self_attn.q_proj", True),  # a '.'-suffix
    (["q_proj"], "q_proj", True),  # exactly
    (["proj"], "model.layers.0.self_attn.q_proj", False),  # not a substring
    (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj", True),
    (r".*\.(q|v)_proj", "model.layers.0.self_attn.v_proj", True),  # a string is a regex over the full name
    (r"q_proj", "model.layers.0.self_attn.q_proj", False),  # ... which must match all of it
])
def test_matches_is_peft_rule(names, key, expected):
    assert matches(names, key) is expected


@pytest.mark.parametrize("text, expected", [
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    (" q_proj , self_attn.o_proj ", ["q_proj", "self_attn.o_proj"]),
    ("all-linear", "all-linear"),
    (r".*_proj", r".*_proj"),
])
def test_parse_names_lists_names_and_keeps_anything_else(text, expected):
    assert parse_names(text) == expected


def test_set_module_replaces_by_dotted_name_and_output_head_finds_the_head():
    model = build("llama")
    new = nn.Identity()
    set_module(model, "model.layers.0.mlp", new)
    assert model.get_submodule("model.layers.0.mlp") is new
    assert output_head(model) is model.lm_head
    assert output_head(nn.Linear(2, 2)) is None
