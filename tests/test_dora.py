"""DoRA and lora_bias adapters: PEFT 0.21's definitions both ways, and the invariants of plain LoRA
(disabled = base, merged = unmerged, save -> load bit-exact), on Llama, Qwen2 and GPT-2 shapes."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import build, logits, perturb_trainables
from safetensors.torch import load_file

import lorakit
from lorakit.errors import UserError
from lorakit.io import WEIGHTS_NAME

# name -> (family, LoraConfig kwargs shared by lorakit and PEFT)
CASES = {
    "llama q,v": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "qwen2 all-linear rslora": ("qwen2", dict(r=4, lora_alpha=4, target_modules="all-linear", use_rslora=True,
                                              use_dora=True)),
    "gpt2 conv1d": ("gpt2", dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                 use_dora=True)),
    "llama embedding": ("llama", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], use_dora=True)),
    "qwen2 lora_bias": ("qwen2", dict(r=2, target_modules=["q_proj", "o_proj"], lora_bias=True)),
    "gpt2 lora_bias": ("gpt2", dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)),
}


def _peft(base, kw, name="default"):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name=name)


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_adapter_loads_with_same_logits(case, ids, tmp_path):
    family, kw = CASES[case]
    base = build(family)
    ref = _peft(base, kw)
    perturb_trainables(ref)
    ref.eval()
    ref.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path)
    assert (logits(model, ids) - ref(input_ids=ids).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("case", CASES)
def test_lorakit_saved_adapter_loads_in_peft_with_same_logits(case, ids, tmp_path):
    family, kw = CASES[case]
    base = build(family)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    perturb_trainables(model)
    lorakit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert any(k.endswith(".lora_magnitude_vector" if kw.get("use_dora") else ".lora_B.bias") for k in keys)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (ref(input_ids=ids).logits - logits(model, ids)).abs().max() <= 1e-6


@pytest.mark.parametrize("case", CASES)
def test_invariants(case, ids, tmp_path):
    """Fresh = base, disabled = base exactly, save -> load bit-exact, merged = unmerged, unmerge restores W."""
    family, kw = CASES[case]
    base = build(family)
    expected_base = logits(base, ids)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    assert (logits(model, ids) - expected_base).abs().max() <= 1e-6  # B = 0, m = ‖W‖: the base
    perturb_trainables(model)
    adapted = logits(model, ids)
    assert (adapted - expected_base).abs().max() > 1e-3
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model, ids), expected_base)

    lorakit.save_adapter(model, tmp_path)
    loaded = copy.deepcopy(base)
    lorakit.load_adapter(loaded, tmp_path)
    saved = lorakit.adapter_state_dict(model)
    assert all(torch.equal(v, saved[k]) for k, v in lorakit.adapter_state_dict(loaded).items())
    assert torch.equal(logits(loaded, ids), adapted)

    if kw.get("lora_bias") and family == "qwen2":  # o_proj has no bias to merge lora_bias into (PEFT refuses too)
        weights = {n: p.clone() for n, p in model.state_dict().items()}
        with pytest.raises(UserError, match="lora_bias"):
            lorakit.merge(model)
        assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
        return
    before = {n: layer.base.weight.detach().clone() for n, layer in lorakit.lora_layers(model)}
    lorakit.merge(model)
    assert (logits(model, ids) - adapted).abs().max() <= 1e-5
    lorakit.unmerge(model)
    for n, layer in lorakit.lora_layers(model):
        assert (layer.base.weight - before[n]).abs().max() <= 1e-6
    assert (logits(model, ids) - adapted).abs().max() <= 1e-6
    plain = lorakit.unload(model, merge=True)
    assert (logits(plain, ids) - adapted).abs().max() <= 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if "embedding" not in c])
def test_gradients_match_peft(case, ids):
    """One backward on the same weights: the fused DoRA backward gives PEFT's gradients for A, B and m."""
    family, kw = CASES[case]
    base = build(family)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    perturb_trainables(model)
    ref = _peft(base, kw)
    theirs = {k.replace(".default", ""): p for k, p in ref.named_parameters() if p.requires_grad}
    ours = lorakit.adapter_state_dict(model)
    with torch.no_grad():  # PEFT's initial weights <- ours
        for key, p in ours.items():
            name = key.removeprefix("base_model.model.")
            match = [v for k, v in theirs.items() if k.endswith(name.replace("lora_magnitude_vector", "lora_magnitude_vector.weight"))]
            assert len(match) == 1, key
            match[0].copy_(p)
    model.eval(), ref.eval()  # no base dropout (GPT-2's); gradients flow all the same
    target = torch.randn(*ids.shape, 97, generator=torch.Generator().manual_seed(3))
    (logits(model, ids) * target).sum().backward()
    (ref(input_ids=ids).logits * target).sum().backward()
    for key, p in ours.items():
        name = key.removeprefix("base_model.model.").replace("lora_magnitude_vector", "lora_magnitude_vector.weight")
        q = next(v for k, v in theirs.items() if k.endswith(name))
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), key


def test_dropout_trains_through_the_plain_path(ids):
    model = lorakit.inject(build("llama"), lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.2,
                                                            use_dora=True))
    perturb_trainables(model)
    model.train()
    logits(model, ids).square().mean().backward()
    layer = next(layer for _, layer in lorakit.lora_layers(model))
    grads = [layer.lora_A["default"].grad, layer.lora_B["default"].grad, layer.lora_magnitude["default"].grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kinds", [("dora", "lora"), ("lora", "dora"), ("dora", "dora")])
def test_several_adapters_active_match_peft(kinds, ids, tmp_path):
    """DoRA and LoRA adapters active together: PEFT applies them in turn, each DoRA scaling the running output."""
    base = build("qwen2")
    ref = None
    for i, kind in enumerate(kinds):
        kw = dict(r=2 + i, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"], use_dora=kind == "dora")
        if ref is None:
            ref = _peft(base, kw, name=f"a{i}")
        else:
            ref.add_adapter(f"a{i}", peft.LoraConfig(**kw))
            ref.base_model.set_adapter([f"a{j}" for j in range(i + 1)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref.eval()
    ref.save_pretrained(tmp_path)
    expected = ref(input_ids=ids).logits
    model = copy.deepcopy(base)
    for i in range(len(kinds)):
        lorakit.load_adapter(model, tmp_path / f"a{i}", adapter=f"a{i}")  # PEFT saves each in its own folder
    lorakit.set_adapters(model, [f"a{i}" for i in range(len(kinds))])
    mixed = logits(model, ids)
    assert (mixed - expected).abs().max() <= 1e-6
    lorakit.merge(model)
    assert (logits(model, ids) - mixed).abs().max() <= 1e-5
    lorakit.unmerge(model)
    lorakit.set_adapters(model, {"a0": 0.5, "a1": 0.7})  # other weights: merged = unmerged still
    mixed = logits(model, ids)
    lorakit.merge(model)
    assert (logits(model, ids) - mixed).abs().max() <= 1e-5


def test_weight_scales_the_dora_effect_linearly(ids):
    model = lorakit.inject(build("llama"), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    perturb_trainables(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, layer.in_features)
    with lorakit.disable_adapters(model):
        y0 = layer(x)
    y1 = layer(x)
    lorakit.set_adapters(model, {"default": 0.3})
    assert torch.allclose(layer(x), y0 + 0.3 * (y1 - y0), atol=1e-6)
    lorakit.set_adapters(model, {"default": 0.0})
    assert torch.allclose(layer(x), y0, atol=1e-6)


def test_combine_refuses_dora_with_the_reason(tmp_path):
    for i in range(2):
        model = lorakit.inject(build("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=i == 0))
        lorakit.save_adapter(model, tmp_path / f"a{i}")
    with pytest.raises(UserError, match="DoRA.*not a DoRA adapter"):
        lorakit.combine([str(tmp_path / "a0"), str(tmp_path / "a1")])


def test_bad_values_are_refused():
    with pytest.raises(UserError, match="use_dora"):
        lorakit.LoraConfig(use_dora="yes")
    with pytest.raises(UserError, match="lora_bias"):
        lorakit.LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(UserError, match="lora_bias"):
        lorakit.inject(build("llama"), lorakit.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))


def test_train_dora_from_the_cli_loads_in_peft_and_resumes(tiny_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    data = tmp_path / "d.txt"
    data.write_text("the crew sailed north at dawn and sang of the sea. " * 40)
    args = ["train", "--base", str(tiny_base), "--data", str(data), "--steps", "4", "--batch-size", "2",
            "--seq-len", "16", "--r", "4", "--dtype", "fp32", "--quiet", "--dora", "--targets", "q_proj,v_proj,down_proj"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    config = json.loads((tmp_path / "straight" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = load_file(tmp_path / "straight" / WEIGHTS_NAME)
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 6  # 3 modules x 2 layers, each trained away from its initial ‖W‖
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "straight")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "straight").eval()
    assert (logits(model, ids) - ref(input_ids=ids).logits).abs().max() <= 1e-6
    with torch.no_grad():
        norms = {k: v for k, v in lorakit.adapter_state_dict(lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))).items() if k in magnitudes}
    assert all(not torch.equal(tensors[k], norms[k]) for k in magnitudes)

    # interrupted after 2 steps and resumed: the same adapter, magnitudes included
    from lorakit.train import TrainConfig, train

    values = dict(data=data, base=str(tiny_base), steps=4, batch_size=2, seq_len=16, r=4, dtype="fp32", quiet=True,
                  dora=True, targets="q_proj,v_proj,down_proj", checkpoint_every=2)
    train(TrainConfig(out=tmp_path / "resumed", **values), should_stop=lambda step: step == 2)
    train(TrainConfig(out=tmp_path / "resumed", resume=True, **values))
    resumed = load_file(tmp_path / "resumed" / WEIGHTS_NAME)
    assert all(torch.equal(resumed[k], v) for k, v in tensors.items())


# -- per-row adapters and serving -------------------------------------------------------------------

SERVE_TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "v_proj"],
                 "gpt2": ["c_attn", "c_proj", "c_fc"]}
SERVE_ADAPTERS = {"d": dict(r=2, use_dora=True), "l": dict(r=6), "e": dict(r=3, use_dora=True)}  # DoRA, LoRA, DoRA
SERVE_MIXES = [{"d": 1.0}, {}, {"l": 1.0}, {"e": 1.0}, {"d": 0.5, "l": 1.5}, {"l": 1.0, "e": 1.0}, {},
               {"e": -1.0, "d": 1.0}]


def _served_model(family):
    model = build(family)
    for name, kw in SERVE_ADAPTERS.items():
        lorakit.inject(model, lorakit.LoraConfig(lora_alpha=2 * kw["r"], target_modules=SERVE_TARGETS[family], **kw),
                       adapter=name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_row_adapters_equal_each_mix_alone(family, ids):
    model = _served_model(family)
    rows = torch.randint(0, 97, (len(SERVE_MIXES), 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with lorakit.per_row_adapters(model, SERVE_MIXES):
            together = logits(model, rows)
        for i, mix in enumerate(SERVE_MIXES):
            if mix:
                lorakit.set_adapters(model, mix)
                alone = logits(model, rows[i:i + 1])
            else:
                with lorakit.disable_adapters(model):
                    alone = logits(model, rows[i:i + 1])
            assert (together[i] - alone[0]).abs().max() <= 1e-5, mix


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_served_dora_greedy_is_the_same_alone_and_in_a_mixed_batch(family):
    from test_serve_engine import prompts, reference, run

    from lorakit.serve.engine import Engine

    model = _served_model(family)
    batch = list(zip(prompts(len(SERVE_MIXES)), SERVE_MIXES))
    expected = [reference(model, p, mix) for p, mix in batch]
    engine = Engine(model, eos_id=None, max_batch=8).start()
    try:
        alone = []
        for p, mix in batch:
            _, out = run(engine, p, mix)
            assert out.done.wait(60)
            alone.append(out.tokens)
        together = [run(engine, p, mix)[1] for p, mix in batch]
        for out in together:
            assert out.done.wait(60)
    finally:
        engine.stop()
    assert alone == expected
    assert [out.tokens for out in together] == expected
    assert engine.stats.max_batch_seen > 1
    assert len({tuple(t) for t in expected}) > 4


def test_qdora_on_an_nf4_base_equals_dora_on_its_dequantized_weights(ids):
    from lorakit import nf4

    quantized = nf4.quantize(build("llama"))
    plain = nf4.dequantize(copy.deepcopy(quantized))  # the same weights, in fp32 Linear layers
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    lorakit.inject(quantized, lorakit.LoraConfig(**kw))
    lorakit.inject(plain, lorakit.LoraConfig(**kw))
    perturb_trainables(quantized)
    ours = lorakit.adapter_state_dict(quantized)
    with torch.no_grad():
        for key, p in lorakit.adapter_state_dict(plain).items():
            p.copy_(ours[key])
    assert (logits(quantized, ids) - logits(plain, ids)).abs().max() <= 1e-6
    target = torch.randn(*ids.shape, 97, generator=torch.Generator().manual_seed(3))
    (logits(quantized, ids) * target).sum().backward()
    (logits(plain, ids) * target).sum().backward()
    theirs = lorakit.adapter_state_dict(plain)
    assert all(torch.allclose(p.grad, theirs[k].grad, atol=1e-5, rtol=1e-4) for k, p in ours.items())


def test_lorakit_merge_streams_dora_into_the_base(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.export import merge_export

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    perturb_trainables(model)
    lorakit.save_adapter(model, tmp_path / "a")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    merge_export([str(tmp_path / "a")], tmp_path / "merged", base=str(tiny_base), dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (logits(merged, ids) - logits(model, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("weight", [1.0, 0.5])  # the fused DoRA path; the plain one
def test_a_zero_weight_row_stays_finite_and_zero(weight, tiny_base, tmp_path):
    """The tiny base's head is tied to an embedding whose padding row is zeros: n = ‖0 + s·B·A‖ = 0 = m at init
    (PEFT's f = m / n is 0/0 there). That row has no direction to rescale: its output stays zero, the rest finite."""
    from transformers import AutoModelForCausalLM

    from lorakit.export import merge_export

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    pad = base.config.pad_token_id
    assert not base.lm_head.weight[pad].any()
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules="all-linear+head", use_dora=True))
    lorakit.set_adapters(model, {"default": weight})
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(model, ids), logits(base, ids), atol=1e-5, rtol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    head = model.lm_head
    assert not head.lora_B["default"].grad[pad].any() and not head.lora_magnitude["default"].grad[pad]
    perturb_trainables(model)  # a trained adapter, whose row of zeros got no gradient: its B and m are still zero
    with torch.no_grad():
        head.lora_B["default"][pad] = 0
        head.lora_magnitude["default"][pad] = 0
    model.eval()
    adapted = logits(model, ids)
    assert torch.isfinite(adapted).all() and not adapted[..., pad].any()
    lorakit.save_adapter(model, tmp_path / "a")
    merge_export([f"{tmp_path / 'a'}:{weight}"], tmp_path / "merged", base=str(tiny_base), dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert (logits(merged, ids) - adapted).abs().max() <= 1e-5
