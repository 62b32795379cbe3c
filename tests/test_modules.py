"""Name matching, the targets parser, module replacement by dotted name, the output head, the walk."""

from __future__ import annotations

import pytest
from conftest import build
from torch import nn

from lorakit.modules import matches, output_head, parse_names, set_module, walk


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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mlp"])
def test_walk_is_named_modules_in_order_and_each_shared_module_once(arch):
    model = build(arch)
    shared = nn.Linear(3, 3)  # one module under two names: listed once, at its first place (as named_modules)
    model.first, model.second = shared, nn.Sequential(shared, nn.ReLU())
    model.absent = None
    assert [(n, id(m)) for n, m in walk(model)] == [(n, id(m)) for n, m in model.named_modules()]


def test_walk_lists_a_stop_module_but_not_its_insides():
    import lorakit

    model = lorakit.inject(build("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    names = [n for n, _ in walk(model, stop=lorakit.LoraLayer)]
    layers = [n for n, m in model.named_modules() if isinstance(m, lorakit.LoraLayer)]
    assert layers and all(n in names for n in layers)
    assert not [n for n in names if any(n.startswith(layer + ".") for layer in layers)]
    inside = [n for n, _ in model.named_modules() if any(n.startswith(layer + ".") for layer in layers)]
    assert sorted(names + inside) == sorted(n for n, _ in model.named_modules())
