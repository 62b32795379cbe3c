"""Initialisations (orthogonal, PiSSA, OLoRA) against PEFT 0.21, PEFT's conversion of PiSSA / OLoRA adapters to
the original base, and which PEFT LoRA configs load (plain-LoRA inference) or are refused by name."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import build, logits, perturb_trainables

import lorakit
from lorakit.errors import UserError
from lorakit.io import WEIGHTS_NAME

BASE_CHANGING = {  # name -> (family, targets, init)
    "pissa llama": ("llama", ["q_proj", "v_proj", "down_proj"], "pissa"),
    "olora qwen2": ("qwen2", ["q_proj", "o_proj"], "olora"),
    "pissa gpt2 conv1d": ("gpt2", ["c_attn", "c_fc"], "pissa"),
    "pissa_niter_4 llama": ("llama", ["q_proj", "v_proj"], "pissa_niter_4"),
}


def _kw(family, targets, init, **more):
    return dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
                fan_in_fan_out=family == "gpt2", **more)


@pytest.mark.parametrize("case", BASE_CHANGING)
def test_init_equals_peft_and_starts_as_the_base(case, ids):
    family, targets, init = BASE_CHANGING[case]
    base = build(family)
    torch.manual_seed(7)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kw(family, targets, init)))
    torch.manual_seed(7)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**_kw(family, targets, init)))
    assert (logits(model, ids) - logits(base, ids)).abs().max() <= 1e-5  # W_res + s·B₀·A₀ = W
    if init.startswith("pissa_niter"):  # a randomised SVD: PEFT draws other random numbers first
        return
    theirs = dict(ref.named_parameters())
    for name, layer in lorakit.lora_layers(model):
        prefix = f"base_model.model.{name}"
        assert torch.allclose(layer.lora_A["default"], theirs[f"{prefix}.lora_A.default.weight"], atol=1e-6)
        assert torch.allclose(layer.lora_B["default"], theirs[f"{prefix}.lora_B.default.weight"], atol=1e-6)
        assert torch.allclose(layer.base.weight, theirs[f"{prefix}.base_layer.weight"], atol=1e-6)  # the residual


@pytest.mark.parametrize("case", BASE_CHANGING)
def test_saved_adapter_is_converted_for_the_original_base(case, ids, tmp_path):
    """Trained after PiSSA / OLoRA, saved, loaded on the untouched base: same outputs, in lorakit and in PEFT."""
    family, targets, init = BASE_CHANGING[case]
    base = build(family)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**_kw(family, targets, init)))
    perturb_trainables(model, scale=0.05)
    trained = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    loaded = copy.deepcopy(base)
    lorakit.load_adapter(loaded, tmp_path)
    assert (logits(loaded, ids) - trained).abs().max() <= 1e-5
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (ref(input_ids=ids).logits - trained).abs().max() <= 1e-5


def test_peft_converted_pissa_adapter_loads_and_unconverted_is_refused(ids, tmp_path):
    base = build("llama")
    kw = _kw("llama", ["q_proj", "v_proj"], "pissa")
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ref.save_pretrained(tmp_path / "init")  # PEFT's recipe: the initial adapter, then the trained one against it
    perturb_trainables(ref, scale=0.05)
    ref.eval()
    expected = ref(input_ids=ids).logits
    ref.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "converted")
    assert (logits(model, ids) - expected).abs().max() <= 1e-5
    ref.save_pretrained(tmp_path / "raw")
    with pytest.raises(UserError, match="init_lora_weights='pissa' without PEFT's conversion"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path / "raw")


def test_orthogonal_init_draws_what_peft_draws():
    base = build("llama")
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  init_lora_weights="orthogonal"))
    peft_layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  init_lora_weights="orthogonal"))
    layer = model.model.layers[0].self_attn.q_proj
    torch.manual_seed(3)
    peft_layer.orthogonal_init("default")
    torch.manual_seed(3)
    lorakit.variants.init.orthogonal(layer.lora_A["default"], layer.lora_B["default"])
    assert torch.equal(layer.lora_A["default"], peft_layer.lora_A["default"].weight)
    assert torch.equal(layer.lora_B["default"], peft_layer.lora_B["default"].weight)
    with pytest.raises(UserError, match="even rank"):
        lorakit.inject(build("llama"), lorakit.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"))


@pytest.mark.parametrize("init,extra", [("eva", {"eva_config": {"rho": 2.0}}), ("lora_ga", {"lora_ga_config": {}}),
                                        ("gaussian", {}), ("orthogonal", {})])
def test_adapters_whose_inference_is_plain_lora_load_like_peft(init, extra, ids, tmp_path):
    base = build("qwen2")
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainables(model, scale=0.05)
    lorakit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init, **extra}))
    loaded = copy.deepcopy(base)
    lorakit.load_adapter(loaded, tmp_path)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (logits(loaded, ids) - ref(input_ids=ids).logits).abs().max() <= 1e-6
    if init in ("eva", "lora_ga"):
        with pytest.raises(UserError, match="needs PEFT's own preprocessing"):
            lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig.load(tmp_path))


@pytest.mark.parametrize("field,value,name", [
    ("alora_invocation_tokens", [3, 4], "invocation tokens"),
    ("velora_config", {"rank": 1}, None),  # VeLoRA changes only how the backward stores activations: loads
    ("kasa_config", {}, None),  # {} is "off" for a None field
    ("kasa_config", {"x": 1}, "KaSA"),
    ("monteclora_config", {"x": 1}, "MonteCLoRA"),
    ("target_parameters", ["mlp.experts.down_proj"], "bare parameters"),
    ("init_lora_weights", "loftq", "LoftQ adapter"),
    ("init_lora_weights", "corda", "corda"),
])
def test_what_needs_peft_is_refused_by_name(field, value, name, tmp_path):
    model = lorakit.inject(build("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    if name is None:
        lorakit.load_adapter(build("llama"), tmp_path)
        return
    with pytest.raises(UserError, match=name):
        lorakit.load_adapter(build("llama"), tmp_path)


def test_pissa_refuses_dora_embedding_and_nf4():
    from lorakit import nf4

    with pytest.raises(UserError, match="DoRA"):
        lorakit.inject(build("llama"), lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa",
                                                          use_dora=True))
    with pytest.raises(UserError, match="Embedding"):
        lorakit.inject(build("llama"), lorakit.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="olora"))
    model = nf4.quantize(build("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="quantized"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tied = build("llama")  # a residual in a tied head would replace the input embedding too
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    embedding = tied.get_input_embeddings().weight.clone()
    with pytest.raises(UserError, match="shares its weight"):
        lorakit.inject(tied, lorakit.LoraConfig(target_modules="all-linear+head", init_lora_weights="pissa"))
    assert torch.equal(tied.get_input_embeddings().weight, embedding) and not list(lorakit.lora_layers(tied))


def test_train_init_pissa_from_the_cli(tiny_base, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    data = tmp_path / "d.txt"
    data.write_text("the crew sailed north at dawn and sang of the sea. " * 40)
    out = tmp_path / "pissa"
    assert main(["train", "--base", str(tiny_base), "--data", str(data), "--eval-data", str(data), "--steps", "4",
                 "--batch-size", "2", "--seq-len", "16", "--r", "4", "--dtype", "fp32", "--quiet", "--init", "pissa",
                 "--targets", "q_proj,v_proj", "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert load_file(out / WEIGHTS_NAME)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["eval_perplexity_adapted"] < summary["eval_perplexity_base"]
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, out)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert (logits(model, ids) - ref(input_ids=ids).logits).abs().max() <= 1e-6
    assert main(["train", "--base", str(tiny_base), "--data", str(data), "--init", "loftq", "--out",
                 str(tmp_path / "x")]) == 2


def test_train_pissa_with_default_targets_leaves_a_tied_head_out(tiny_base, tmp_path, capsys):
    from safetensors.torch import load_file

    from lorakit.cli import main

    data = tmp_path / "d.txt"
    data.write_text("the crew sailed north at dawn and sang of the sea. " * 40)
    args = ["train", "--base", str(tiny_base), "--data", str(data), "--steps", "2", "--batch-size", "2", "--seq-len",
            "16", "--r", "2", "--dtype", "fp32", "--quiet", "--init", "olora"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0  # the default targets: every linear layer, no head
    keys = load_file(tmp_path / "a" / WEIGHTS_NAME)
    assert any(".mlp.down_proj." in k for k in keys) and not any("lm_head" in k for k in keys)
    assert main(["train", "--base", str(tiny_base), "--data", str(data), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--r", "2", "--dtype", "fp32", "--quiet", "--out", str(tmp_path / "c")]) == 0  # plain: +head
    assert any("lm_head" in k for k in load_file(tmp_path / "c" / WEIGHTS_NAME))
    capsys.readouterr()
    assert main(args + ["--targets", "q_proj,lm_head", "--out", str(tmp_path / "b")]) == 2  # named: refused
    assert "tied" in capsys.readouterr().err and not (tmp_path / "b").exists()
