"""Hostile adapter directories: adapter_config.json with wrong types, absurd sizes and PEFT features we do
not implement; safetensors files with odd dtypes, shapes and keys; paths that loop.

Every case is tried three ways: `lorakit inspect DIR` (reads and checks the files), `lorakit generate
--adapter DIR` on a tiny base (reads, injects, copies), and `lorakit.load_adapter` in Python on a model
that must come out exactly as it went in (every tensor, the module tree, requires_grad, the adapters).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.base import load_base
from lorakit.errors import UserError
from tests.conftest import randomize_adapters
from tests.hostile import assert_refused, assert_unchanged, run_cli, snapshot

PREFIX = "base_model.model."
Q0 = PREFIX + "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def good(tiny_base, tmp_path_factory):
    """A valid adapter for the tiny base (q_proj, v_proj, r=4), which each case then spoils."""
    root = tmp_path_factory.mktemp("good")
    model, _ = load_base(tiny_base, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return lorakit.save_adapter(model, root / "adapter")


@dataclass
class Case:
    id: str
    config: dict[str, Any] | Callable[[dict], Any] | None = None  # fields to set (None values delete), or a function
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    raw_config: bytes | None = None  # adapter_config.json's bytes, as given
    setup: Callable[[Path], None] | None = None  # anything else, on the adapter directory
    mentions: str | None = None
    where: tuple[str, ...] = ("inspect", "generate", "python")  # entry points that must refuse it


MODEL = ("generate", "python")  # only a model can tell (the file alone is a valid adapter)


def _set(**fields) -> dict[str, Any]:
    return fields


def _f8(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float8_e4m3fn) for k, v in t.items()}


def _grow_rank(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(t)
    out[Q0 + ".lora_A.weight"] = torch.zeros(5, t[Q0 + ".lora_A.weight"].shape[1])
    return out


def _drop(key: str):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _nan(t):
    out = dict(t)
    out[Q0 + ".lora_B.weight"] = torch.full_like(t[Q0 + ".lora_B.weight"], float("nan"))
    return out


def _huge_values(t):
    out = dict(t)
    out[Q0 + ".lora_B.weight"] = torch.full_like(t[Q0 + ".lora_B.weight"], 3e38)
    return out


def _with(key: str, value: torch.Tensor):
    return lambda t: {**t, key: value}


PEFT_MATHS = {  # PEFT 0.21.2 LoraConfig fields that change what the adapter computes, set to something "on"
    # (use_dora, lora_bias and trainable_token_indices load, but this file lacks the tensors they imply; eva / corda / loftq / lora_ga
    # configs only describe how an init ran: init_lora_weights decides, see tests/test_init.py)
    "use_dora": True, "lora_bias": True, "use_qalora": True, "layer_replication": [[0, 1]],
    "target_parameters": ["mlp.experts.down_proj"], "kasa_config": {"beta": 1.0}, "monteclora_config": {"num_samples": 4}, "trainable_token_indices": [1, 2],
    "alora_invocation_tokens": [5, 6], "megatron_config": {"tensor_model_parallel_size": 2},
    "arrow_config": {"top_k": 2}, "use_bdlora": {"nblocks": 2}, "ensure_weight_tying": True,
    "init_lora_weights": "pissa",
}

CASES = [
    # adapter_config.json: not a config at all
    Case("config-missing", setup=lambda d: (d / "adapter_config.json").unlink(), mentions="adapter_config.json"),
    Case("config-not-json", raw_config=b"{nope", mentions="JSON"),
    Case("config-empty-file", raw_config=b"", mentions="JSON"),
    Case("config-not-utf8", raw_config=b'{"r": 4, "x": "\xff"}', mentions="adapter_config.json"),
    Case("config-json-list", raw_config=b"[1, 2, 3]", mentions="object"),
    Case("config-json-string", raw_config=b'"hello"', mentions="object"),
    Case("config-json-null", raw_config=b"null", mentions="object"),
    Case("config-5000-digit-number", raw_config=b'{"r": ' + b"9" * 5000 + b"}", mentions="adapter_config.json"),
    Case("config-deep-nesting", raw_config=b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
         mentions="adapter_config.json"),
    Case("config-nan-literal", config=_set(lora_alpha=float("nan")), mentions="lora_alpha"),
    Case("config-infinity-literal", config=_set(lora_alpha=float("inf")), mentions="lora_alpha"),
    Case("config-is-directory", setup=lambda d: ((d / "adapter_config.json").unlink(),
                                                  (d / "adapter_config.json").mkdir()), mentions="adapter_config.json"),
    # adapter_config.json: wrong types, field by field
    Case("r-string", config=_set(r="4"), mentions="r"),
    Case("r-float", config=_set(r=4.0), mentions="r"),
    Case("r-bool", config=_set(r=True), mentions="r"),
    Case("r-zero", config=_set(r=0), mentions="r"),
    Case("r-null", config=_set(r=None), mentions="r"),
    Case("r-billion", config=_set(r=10**9, rank_pattern={}), mentions="r"),
    Case("r-huge-int", config=_set(r=10**30), mentions="r"),
    Case("lora-alpha-string", config=_set(lora_alpha="8"), mentions="lora_alpha"),
    Case("lora-alpha-list", config=_set(lora_alpha=[8]), mentions="lora_alpha"),
    Case("lora-alpha-huge", config=_set(lora_alpha=1e308 * 10 if False else 10**400), mentions="lora_alpha"),
    Case("lora-dropout-string", config=_set(lora_dropout="0.1"), mentions="lora_dropout"),
    Case("lora-dropout-bool", config=_set(lora_dropout=True), mentions="lora_dropout"),
    Case("target-modules-number", config=_set(target_modules=5), mentions="target_modules"),
    Case("target-modules-dict", config=_set(target_modules={"q_proj": 1}), mentions="target_modules"),
    Case("target-modules-list-of-numbers", config=_set(target_modules=[1, 2]), mentions="target_modules"),
    Case("target-modules-list-with-null", config=_set(target_modules=["q_proj", None]), mentions="target_modules"),
    Case("target-modules-bad-regex", config=_set(target_modules="(q"), mentions="target_modules"),
    Case("target-modules-empty-list", config=_set(target_modules=[]), mentions="target_modules"),
    Case("exclude-modules-number", config=_set(exclude_modules=3), mentions="exclude_modules"),
    Case("exclude-modules-list-of-lists", config=_set(exclude_modules=[["x"]]), mentions="exclude_modules"),
    Case("bias-unknown", config=_set(bias="some"), mentions="bias"),
    Case("bias-number", config=_set(bias=1), mentions="bias"),
    Case("use-rslora-string", config=_set(use_rslora="yes"), mentions="use_rslora"),
    Case("fan-in-fan-out-number", config=_set(fan_in_fan_out=2), mentions="fan_in_fan_out"),
    Case("init-lora-weights-number", config=_set(init_lora_weights=3), mentions="init_lora_weights"),
    Case("rank-pattern-list", config=_set(rank_pattern=["q_proj", 8]), mentions="rank_pattern"),
    Case("rank-pattern-string-rank", config=_set(rank_pattern={"q_proj": "8"}), mentions="rank_pattern"),
    Case("rank-pattern-bad-regex", config=_set(rank_pattern={"(q": 8}), mentions="rank_pattern"),
    Case("rank-pattern-huge", config=_set(rank_pattern={"q_proj": 10**9}), mentions="q_proj"),
    Case("alpha-pattern-list", config=_set(alpha_pattern=[1]), mentions="alpha_pattern"),
    Case("alpha-pattern-negative", config=_set(alpha_pattern={"q_proj": -1}), mentions="alpha_pattern"),
    Case("layers-to-transform-string", config=_set(layers_to_transform="0"), mentions="layers_to_transform"),
    Case("layers-to-transform-list-of-strings", config=_set(layers_to_transform=["0"]), mentions="layers_to_transform"),
    Case("layers-to-transform-negative", config=_set(layers_to_transform=-1), mentions="layers_to_transform"),
    Case("layers-to-transform-float", config=_set(layers_to_transform=0.5), mentions="layers_to_transform"),
    Case("layers-pattern-number", config=_set(layers_to_transform=[0], layers_pattern=7), mentions="layers_pattern"),
    Case("layers-pattern-bad-regex", config=_set(layers_to_transform=[0], layers_pattern="(x"),
         mentions="layers_pattern"),
    Case("modules-to-save-string", config=_set(modules_to_save="lm_head"), mentions="modules_to_save"),
    Case("modules-to-save-numbers", config=_set(modules_to_save=[1]), mentions="modules_to_save"),
    Case("modules-to-save-matches-nothing", config=_set(modules_to_save=["nothing_like_it"]),
         mentions="modules_to_save", where=MODEL),
    Case("base-model-name-number", config=_set(base_model_name_or_path=12), mentions="base_model_name_or_path"),
    Case("peft-type-other", config=_set(peft_type="IA3"), mentions="peft_type"),
    Case("peft-type-number", config=_set(peft_type=3), mentions="peft_type"),
    *(Case(f"peft-{key.replace('_', '-')}", config={key: value}, mentions=key) for key, value in PEFT_MATHS.items()),
    # adapter_model.safetensors
    Case("weights-missing", setup=lambda d: (d / "adapter_model.safetensors").unlink(), mentions="safetensors"),
    Case("weights-only-pickle", setup=lambda d: ((d / "adapter_model.safetensors").unlink(),
                                                  (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")),
         mentions="pickle"),
    Case("weights-truncated", setup=lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:100]), mentions="safetensors"),
    Case("weights-empty-file", setup=lambda d: (d / "adapter_model.safetensors").write_bytes(b""),
         mentions="safetensors"),
    Case("weights-huge-header-length", setup=lambda d: (d / "adapter_model.safetensors").write_bytes(
        (2**62).to_bytes(8, "little") + b"{}"), mentions="safetensors"),
    Case("weights-header-not-json", setup=lambda d: (d / "adapter_model.safetensors").write_bytes(
        (5).to_bytes(8, "little") + b"{nope"), mentions="safetensors"),
    Case("weights-is-directory", setup=lambda d: ((d / "adapter_model.safetensors").unlink(),
                                                   (d / "adapter_model.safetensors").mkdir()), mentions="safetensors"),
    Case("weights-float8", tensors=_f8, mentions="float8"),
    Case("weights-int64", tensors=lambda t: {k: v.to(torch.int64) for k, v in t.items()}, mentions="int64"),
    Case("weights-bool", tensors=lambda t: {k: v > 0 for k, v in t.items()}, mentions="bool"),
    Case("weights-nan", tensors=_nan, mentions="NaN"),
    Case("weights-overflow-to-inf-in-bf16", tensors=lambda t: {k: v.to(torch.float64) * 1e300 for k, v in t.items()},
         mentions="finite"),
    Case("weights-rank-disagrees-with-config", tensors=_grow_rank, mentions="q_proj"),
    Case("weights-missing-b", tensors=_drop(Q0 + ".lora_B.weight"), mentions="lora_B"),
    Case("weights-unknown-module", tensors=_with(PREFIX + "model.nowhere.lora_A.weight", torch.zeros(4, 8)),
         mentions="nowhere", where=MODEL),
    Case("weights-3d-tensor", tensors=_with(Q0 + ".lora_A.weight", torch.zeros(4, 2, 16)), mentions="q_proj"),
    Case("weights-scalar", tensors=_with(Q0 + ".lora_A.weight", torch.tensor(1.0)), mentions="q_proj"),
    Case("weights-no-tensors", tensors=lambda t: {}, mentions="lora_A"),
    Case("weights-key-without-prefix", tensors=lambda t: {k.removeprefix(PREFIX): v for k, v in t.items()},
         mentions="adapter", where=MODEL),
    # paths
    Case("directory-symlink-loop", setup=lambda d: (shutil.rmtree(d), os.symlink(d, d)), mentions="loop"),
    Case("config-symlink-loop", setup=lambda d: ((d / "adapter_config.json").unlink(),
                                                  os.symlink(d / "adapter_config.json", d / "adapter_config.json")),
         mentions="adapter_config.json"),
    Case("weights-symlink-loop", setup=lambda d: ((d / "adapter_model.safetensors").unlink(),
                                                   os.symlink(d / "adapter_model.safetensors",
                                                              d / "adapter_model.safetensors")),
         mentions="adapter_model.safetensors"),
    Case("weights-fifo", setup=lambda d: ((d / "adapter_model.safetensors").unlink(),
                                           os.mkfifo(d / "adapter_model.safetensors")), mentions="regular file"),
    Case("config-fifo", setup=lambda d: ((d / "adapter_config.json").unlink(), os.mkfifo(d / "adapter_config.json")),
         mentions="regular file"),
]


def spoil(good: Path, into: Path, case: Case) -> Path:
    """A copy of the good adapter at `into`, spoiled as `case` says."""
    shutil.copytree(good, into)
    if case.config is not None:
        data = json.loads((into / "adapter_config.json").read_text())
        if callable(case.config):
            data = case.config(data)
        else:
            for key, value in case.config.items():
                data[key] = value
        (into / "adapter_config.json").write_text(json.dumps(data))
    if case.raw_config is not None:
        (into / "adapter_config.json").write_bytes(case.raw_config)
    if case.tensors is not None:
        from safetensors.torch import load_file

        tensors = case.tensors(load_file(into / "adapter_model.safetensors"))
        save_file(tensors, into / "adapter_model.safetensors")
    if case.setup is not None:
        case.setup(into)
    return into


def model_state(model: torch.nn.Module) -> tuple:
    """Everything a failed load must leave as it was: tensors (bitwise), module tree, flags, adapters."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    tree = [(name, type(m).__name__, m.training, "forward" in m.__dict__) for name, m in model.named_modules()]
    return tensors, grads, tree, repr(model), dict(lorakit.adapters.adapter_configs(model)), \
        lorakit.active_adapters(model)


def assert_same_state(before: tuple, after: tuple) -> None:
    tensors0, *rest0 = before
    tensors1, *rest1 = after
    assert tensors0.keys() == tensors1.keys()
    for key in tensors0:
        assert tensors0[key].dtype == tensors1[key].dtype and torch.equal(tensors0[key], tensors1[key]), key
    assert rest0 == rest1


def _for(entry: str) -> list[Case]:
    return [c for c in CASES if entry in c.where]


@pytest.mark.parametrize("case", _for("inspect"), ids=lambda c: c.id)
def test_inspect_refuses_in_one_line(case, good, tmp_path):
    adapter = spoil(good, tmp_path / "a", case)
    before = snapshot(tmp_path)
    run = run_cli(["inspect", adapter], cwd=tmp_path)
    assert_refused(run, 2, case.mentions)
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("case", _for("generate"), ids=lambda c: c.id)
def test_generate_refuses_in_one_line(case, good, tiny_base, tmp_path):
    adapter = spoil(good, tmp_path / "a", case)
    before = snapshot(tmp_path)
    run = run_cli(["generate", "--base", tiny_base, "--adapter", adapter, "--prompt", "The cat", "--max-new-tokens",
                   "2", "--dtype", "fp32"], cwd=tmp_path)
    assert_refused(run, 2, case.mentions)
    assert_unchanged(before, snapshot(tmp_path))


@pytest.fixture(scope="module")
def loaded(tiny_base, good):
    """A model that already carries one adapter (so a failed load must keep it, and its active set)."""
    model, _ = load_base(tiny_base, dtype=torch.float32)
    lorakit.load_adapter(model, good, adapter="kept")
    return model


@pytest.mark.parametrize("case", _for("python"), ids=lambda c: c.id)
def test_failed_python_load_leaves_the_model_as_it_was(case, good, loaded, tmp_path):
    adapter = spoil(good, tmp_path / "a", case)
    before = model_state(loaded)
    with pytest.raises(UserError):
        lorakit.load_adapter(loaded, adapter, adapter="new")
    assert_same_state(before, model_state(loaded))


@pytest.mark.parametrize("summary", [b"{nope", b"[1, 2]", b'{"memory": [1]}', b'{"memory": {"base_bytes": "x"}}',
                                     b'{"memory": {}}'])
def test_inspect_shows_an_adapter_whose_side_files_are_odd(summary, good, tmp_path):
    """What inspect reads beside the adapter is informational: a base name that cannot be opened or a broken
    training_summary.json leaves that line out; the adapter itself is still reported (exit 0)."""
    adapter = spoil(good, tmp_path / "a", Case("odd", config=_set(base_model_name_or_path="~nosuchuser_xyz/model")))
    (adapter / "training_summary.json").write_bytes(summary)
    run = run_cli(["inspect", adapter], cwd=tmp_path)
    assert run.code == 0 and not run.err, run.err
    assert "base size unknown" in run.out and "q_proj" in run.out


@pytest.mark.parametrize("name", ["lora.v2", "llama-3.1-lora", "a%2Eb", "v1.0.0-rc.1"])
def test_adapter_names_with_dots_simply_work(name, good, tiny_base, tmp_path):
    """A folder called 'lora.v2' is an adapter named 'lora.v2': load, run, save, delete, next to another."""
    model, _ = load_base(tiny_base, dtype=torch.float32)
    adapter = shutil.copytree(good, tmp_path / name)
    ids = torch.tensor([[1, 5, 7, 9]])
    lorakit.load_adapter(model, good, adapter="plain")
    expected = model(ids).logits
    assert lorakit.load_adapter(model, adapter, adapter=name) == name
    lorakit.set_adapters(model, name)
    assert torch.equal(model(ids).logits, expected)
    with lorakit.per_row_adapters(model, [name]):
        assert torch.allclose(model(ids).logits, expected, atol=1e-6)
    lorakit.save_adapter(model, tmp_path / "again", adapter=name)
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == \
        (good / "adapter_model.safetensors").read_bytes()
    lorakit.delete_adapter(model, name)
    assert set(lorakit.adapters.adapter_configs(model)) == {"plain"}
    run = run_cli(["generate", "--base", tiny_base, "--adapter", adapter, "--prompt", "The cat", "--greedy",
                   "--max-new-tokens", "3", "--dtype", "fp32"], cwd=tmp_path)
    assert run.code == 0 and "Traceback" not in run.err, run.err


def test_velora_config_changes_only_the_backward_and_loads(good, tiny_base, tmp_path):
    adapter = spoil(good, tmp_path / "a", Case("velora", config=_set(velora_config={"num_groups": 32, "scale": 1.0})))
    model, _ = load_base(tiny_base, dtype=torch.float32)
    lorakit.load_adapter(model, adapter)
    lorakit.save_adapter(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["velora_config"] == \
        {"num_groups": 32, "scale": 1.0}
