"""One LoRA'd linear, forward + backward: lorakit vs PEFT vs the bare matmul, in the same run.

d=512, r=16, batch 16x128, fp32 and bf16 autocast. The number that matters is each one's overhead
over the bare frozen linear (which still computes the input gradient). Target: lorakit's overhead
at most half of PEFT's. bf16 gets fewer repeats: without AVX-512 BF16 / AMX a bf16 matmul is ~30x
slower than fp32 here.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

import lorakit
from benchmarks.common import interleaved

D, R, BATCH, SEQ = 512, 16, 16, 128


class One(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool):
    def run():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            y = module(x)
        y.backward(grad.to(y.dtype))
        x.grad = None
        for p in module.parameters():
            p.grad = None
    return run


def run(rounds: int = 5, repeats: int = 10, quick: bool = False) -> list[dict]:
    import peft

    torch.manual_seed(0)
    linear = nn.Linear(D, D)
    linear.requires_grad_(False)
    bare = One(copy.deepcopy(linear))
    ours = lorakit.inject(One(copy.deepcopy(linear)), lorakit.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))
    theirs = peft.get_peft_model(One(copy.deepcopy(linear)), peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))
    rows = []
    for precision, autocast in (("fp32", False), ("bf16 autocast", True)):
        x = torch.randn(BATCH, SEQ, D, requires_grad=True)
        grad = torch.randn(BATCH, SEQ, D)
        if autocast:  # ~2 s per bf16 matmul of this size here
            timing = dict(rounds=1 if quick else max(2, rounds // 2), repeats=1, warmup=1)
        else:
            timing = dict(rounds=1 if quick else rounds, repeats=3 if quick else repeats, warmup=3)
        t = interleaved({name: _step(m, x, grad, autocast) for name, m in
                         (("bare", bare), ("lorakit", ours), ("peft", theirs))}, **timing)
        base = t["bare"]["median"]
        ours_over = t["lorakit"]["median"] / base - 1
        peft_over = t["peft"]["median"] / base - 1
        rows.append({
            "id": 0, "benchmark": f"one LoRA linear fwd+bwd overhead over bare, {precision}",
            "bare": t["bare"], "lorakit": t["lorakit"], "peft": t["peft"],
            "value": ours_over, "unit": "overhead", "peft_value": peft_over,
            "ratio": ours_over / peft_over if peft_over > 0 else float("nan"),
            "target": "<= 0.5x PEFT's overhead",
            "met": peft_over > 0 and ours_over <= 0.5 * peft_over,
            "setup": f"d={D}, r={R}, batch {BATCH}x{SEQ}",
        })
    return rows
