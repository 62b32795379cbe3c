"""Benchmark 5: inference with adapters, no grad, on the ~25M Llama-shaped model (batch 8x256, fp32).

- unmerged: one active r=16 adapter on every linear but the head, against the same adapter merged;
- mixed: a batch whose 8 rows use 8 different adapters (`lorakit.per_row_adapters`), against the
  single-adapter batch; PEFT's mixed batch (`adapter_names=`) and its single-adapter batch beside it.
"""

from __future__ import annotations

import copy

import torch

import lorakit
from benchmarks.common import LLAMA_25M, LLAMA_SMALL, interleaved, llama, token_batch

R, ADAPTERS = 16, 8


def _config():
    return lorakit.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear")


def _randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def lorakit_models(base):
    """(model with 8 adapters, a0 active and unmerged; a copy with a0 alone, merged)."""
    model = copy.deepcopy(base)
    for i in range(ADAPTERS):
        lorakit.inject(model, _config(), adapter=f"a{i}")
        _randomize(lorakit.adapter_state_dict(model, f"a{i}").values(), seed=i)
    lorakit.set_adapters(model, "a0")
    merged = copy.deepcopy(base)
    lorakit.inject(merged, _config(), adapter="a0")
    with torch.no_grad():
        for key, value in lorakit.adapter_state_dict(model, "a0").items():
            lorakit.adapter_state_dict(merged, "a0")[key].copy_(value)
    lorakit.merge(merged)
    return model.eval(), merged.eval()


def peft_model(base):
    import peft

    config = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear")
    model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, ADAPTERS):
        model.add_adapter(f"a{i}", copy.deepcopy(config))
    for i in range(ADAPTERS):
        _randomize([p for n, p in model.named_parameters() if f".a{i}." in n and "lora_" in n], seed=i)
    model.set_adapter("a0")
    return model.eval()


def run(rounds: int = 3, repeats: int = 2, quick: bool = False) -> list[dict]:
    shape, (b, s) = (LLAMA_SMALL, (8, 64)) if quick else (LLAMA_25M, (8, 256))
    base = llama(shape)
    batch = token_batch(shape["vocab_size"], b, s)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ours, merged = lorakit_models(base)
    theirs = peft_model(base)
    names = [f"a{i}" for i in range(ADAPTERS)]

    def ours_mixed():
        with lorakit.per_row_adapters(ours, names):
            ours(**inputs)

    fns = {
        "merged": lambda: merged(**inputs),
        "lorakit single": lambda: ours(**inputs),
        "lorakit mixed": ours_mixed,
        "peft single": lambda: theirs(**inputs),
        "peft mixed": lambda: theirs(**inputs, adapter_names=names),
    }
    with torch.no_grad():
        t = interleaved(fns, rounds=rounds, repeats=repeats, warmup=2)
    overhead = t["lorakit single"]["median"] / t["merged"]["median"] - 1
    mixed = t["lorakit mixed"]["median"] / t["lorakit single"]["median"]
    peft_mixed = t["peft mixed"]["median"] / t["peft single"]["median"]
    setup = f"{'25M' if shape is LLAMA_25M else 'small'} model, batch {b}x{s}, fp32, no grad"
    return [
        {"id": 5, "benchmark": "inference: unmerged adapter over merged", "lorakit": t["lorakit single"],
         "merged": t["merged"], "peft": t["peft single"], "value": overhead, "unit": "overhead",
         "peft_value": t["peft single"]["median"] / t["merged"]["median"] - 1,
         "target": "<= 3%", "met": overhead <= 0.03, "setup": setup},
        {"id": 5, "benchmark": "inference: batch mixing 8 adapters / single adapter", "lorakit": t["lorakit mixed"],
         "single": t["lorakit single"], "peft": t["peft mixed"], "peft_single": t["peft single"],
         "value": mixed, "unit": "x single", "peft_value": peft_mixed,
         "target": "<= 1.1x", "met": mixed <= 1.1, "setup": setup},
    ]
