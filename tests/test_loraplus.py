"""LoRA+ parameter groups against PEFT's create_loraplus_optimizer, and `lorakit train --lr-ratio`."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import build
from peft.optimizers import create_loraplus_optimizer

import lorakit
from lorakit.loraplus import loraplus_groups

CASES = {
    "llama dora + embedding + modules_to_save": ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj", "v_proj"],
                                                               use_dora=True, modules_to_save=["lm_head"])),
    "gpt2 bias all": ("gpt2", dict(r=2, target_modules=["c_attn", "c_fc"], bias="all", fan_in_fan_out=True)),
    "qwen2 lora_bias + lora_only": ("qwen2", dict(r=2, target_modules=["q_proj", "o_proj"], lora_bias=True,
                                                  bias="lora_only")),
}


def _signature(groups) -> list[tuple]:
    """Per group: lr, weight decay, and the sorted shapes of its parameters (the models differ only in names)."""
    return [(g["lr"], g["weight_decay"], sorted(tuple(p.shape) for p in g["params"])) for g in groups]


@pytest.mark.parametrize("case", CASES)
def test_groups_equal_peft_create_loraplus_optimizer(case):
    family, kw = CASES[case]
    base = build(family)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    theirs = create_loraplus_optimizer(ref, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16,
                                       loraplus_weight_decay=0.01, loraplus_lr_embedding=3e-6)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    ours = loraplus_groups(model, lr=2e-4, ratio=16, weight_decay=0.01, lr_embedding=3e-6)
    assert _signature(ours) == _signature(theirs.param_groups)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in ours) == len(trainable)  # each trainable parameter exactly once
    assert ours[2]["params"]  # B always has members


def test_train_with_lr_ratio_moves_b_faster(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from lorakit.train import TrainConfig, train

    data = tmp_path / "d.txt"
    data.write_text("the crew sailed north at dawn and sang of the sea. " * 40)
    values = dict(data=data, base=str(tiny_base), steps=3, batch_size=2, seq_len=16, r=4, dtype="fp32", quiet=True,
                  targets="q_proj,v_proj", lr=1e-3, warmup=0.0)
    train(TrainConfig(out=tmp_path / "plain", **values))
    train(TrainConfig(out=tmp_path / "plus", lr_ratio=8.0, **values))
    plain, plus = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "plus"))
    for key in plain:
        if key.endswith("lora_B.weight"):  # B starts at zero: Adam moves it ~8x as far in the same steps
            ratio = plus[key].abs().mean() / plain[key].abs().mean()
            assert 4 < ratio < 12, (key, float(ratio))
