"""Fault injection: a load (or an inject) that fails at any step leaves the model exactly as it was.

Each step of `load_adapter` (wrapping a layer, adding an adapter to it, copying modules_to_save, the lean
MLP forward, freezing, copying each tensor in) is made to raise on its n-th call, for every n a real load
makes; after each failure every tensor, the module tree, requires_grad, the active set and the adapter
table must equal what they were, and a clean load must still work afterwards.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import adapters as adapters_module
from lorakit import mlp
from lorakit.base import load_base
from lorakit.layers import LoraLayer, SavedModule
from tests.conftest import randomize_adapters
from tests.test_hostile_adapters import assert_same_state, model_state

STEPS = [(adapters_module, "_wrap"), (LoraLayer, "add_adapter"), (SavedModule, "add_adapter"), (mlp, "install"),
         (adapters_module, "mark_trainable"), (torch.nn.Parameter, "copy_"), (torch.nn.Parameter, "requires_grad_")]


class Injected(RuntimeError):
    pass


@pytest.fixture(scope="module")
def saved(tiny_base, tmp_path_factory):
    """An adapter touching every kind of step: attention and MLP layers (the lean MLP), an embedding, and a
    modules_to_save copy."""
    root = tmp_path_factory.mktemp("faults")
    model, _ = load_base(tiny_base, dtype=torch.float32)
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj", "embed_tokens"],
                                modules_to_save=["model.norm"])
    lorakit.inject(model, config, adapter="new")
    randomize_adapters(model)
    return lorakit.save_adapter(model, root / "new", adapter="new")


def counting(owner, name: str, fail_at: int | None, calls: list[int]):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise Injected(f"{name} call {fail_at}")
        return original(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("owner, name", STEPS, ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n in STEPS])
def test_a_load_failing_at_any_step_leaves_the_model_as_it_was(owner, name, saved, tiny_base, monkeypatch):
    model, _ = load_base(tiny_base, dtype=torch.float32)
    lorakit.load_adapter(model, saved, adapter="kept", trainable=True)  # a model already carrying an adapter
    lorakit.set_adapters(model, {"kept": 0.5})
    before = model_state(model)

    calls = [0]
    with monkeypatch.context() as m:  # a dry run on a copy counts this step's calls in one load
        import copy

        m.setattr(owner, name, counting(owner, name, None, calls))
        lorakit.load_adapter(copy.deepcopy(model), saved, adapter="new")
    total = calls[0]
    assert total > 0, f"{name} is not a step of a load"
    for n in range(1, total + 1):
        with monkeypatch.context() as m:
            m.setattr(owner, name, counting(owner, name, n, [0]))
            with pytest.raises(Injected):
                lorakit.load_adapter(model, saved, adapter="new")
        assert_same_state(before, model_state(model))
    lorakit.load_adapter(model, saved, adapter="new")  # and the model still takes the adapter cleanly
    assert set(lorakit.adapters.adapter_configs(model)) == {"kept", "new"}


@pytest.mark.parametrize("owner, name", STEPS[:5], ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n in STEPS[:5]])
def test_an_inject_failing_at_any_step_leaves_the_model_as_it_was(owner, name, tiny_base, monkeypatch):
    model, _ = load_base(tiny_base, dtype=torch.float32)
    config = lambda: lorakit.LoraConfig(r=2, target_modules=["q_proj", "down_proj", "embed_tokens"],  # noqa: E731
                                        modules_to_save=["model.norm"], lora_dropout=0.1)
    lorakit.inject(model, config(), adapter="kept")
    before = model_state(model)
    calls = [0]
    with monkeypatch.context() as m:
        import copy

        m.setattr(owner, name, counting(owner, name, None, calls))
        lorakit.inject(copy.deepcopy(model), config(), adapter="new")
    for n in range(1, calls[0] + 1):
        with monkeypatch.context() as m:
            m.setattr(owner, name, counting(owner, name, n, [0]))
            with pytest.raises(Injected):
                lorakit.inject(model, config(), adapter="new")
        assert_same_state(before, model_state(model))
