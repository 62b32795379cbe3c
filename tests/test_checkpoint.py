"""Checkpoints: adapter, optimizer, schedule and RNG come back exactly; a crash mid-swap loses nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import build, randomize_adapters

import lorakit
from lorakit.checkpoint import load_checkpoint, save_checkpoint
from lorakit.errors import UserError
from lorakit.files import previous_directory

SETTINGS = {"r": 2, "lr": 0.01}


def _run():
    """A model with an adapter, AdamW and a schedule after one step."""
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    for p in lorakit.adapter_state_dict(model).values():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _state(model, optimizer, scheduler):
    adapter = {k: v.detach().clone() for k, v in lorakit.adapter_state_dict(model).items()}
    return adapter, optimizer.state_dict()["state"], scheduler.state_dict()


def test_save_then_load_restores_everything(tmp_path):
    model, optimizer, scheduler = _run()
    state = {"step": 1, "tokens": 12, "train_seconds": 0.5}
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, state, SETTINGS)
    expected = _state(model, optimizer, scheduler)
    rng = torch.get_rng_state()
    torch.rand(3)  # move the RNG on; the checkpoint must bring it back

    other = _run()  # a fresh run, then one more step so that it differs
    other[1].step()
    other[2].step()
    assert load_checkpoint(tmp_path / "checkpoint", *other, SETTINGS) == state
    got = _state(*other)
    assert all(torch.equal(got[0][k], expected[0][k]) for k in expected[0])
    for slot, values in expected[1].items():
        assert all(torch.equal(got[1][slot][k], v) for k, v in values.items())
    assert got[2]["last_epoch"] == expected[2]["last_epoch"]
    assert torch.equal(torch.get_rng_state(), rng)


def test_load_falls_back_to_the_previous_checkpoint_after_a_crash_mid_swap(tmp_path):
    model, optimizer, scheduler = _run()
    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, model, optimizer, scheduler, {"step": 4, "tokens": 0, "train_seconds": 0.0}, SETTINGS)
    directory.rename(previous_directory(directory))  # the moment between the two renames of a swap
    assert load_checkpoint(directory, model, optimizer, scheduler, SETTINGS)["step"] == 4


def test_a_second_save_replaces_the_first_and_leaves_nothing_beside_it(tmp_path):
    model, optimizer, scheduler = _run()
    directory = tmp_path / "checkpoint"
    for step in (1, 2):
        save_checkpoint(directory, model, optimizer, scheduler, {"step": step, "tokens": 0, "train_seconds": 0.0},
                        SETTINGS)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert load_checkpoint(directory, model, optimizer, scheduler, SETTINGS)["step"] == 2


def test_changed_settings_and_a_missing_checkpoint_are_refused(tmp_path):
    model, optimizer, scheduler = _run()
    with pytest.raises(UserError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, SETTINGS)
    save_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, {"step": 1, "tokens": 0,
                                                                             "train_seconds": 0.0}, SETTINGS)
    with pytest.raises(UserError, match=r"changes --lr \(was 0.01, now 0.5\)"):
        load_checkpoint(tmp_path / "checkpoint", model, optimizer, scheduler, {**SETTINGS, "lr": 0.5})
