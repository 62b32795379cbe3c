"""A DoRA training step against a LoRA step, lorakit and PEFT side by side in the same interleaved rounds.

The ~25M Llama-shaped model of `train_step.py`, r=16 on every linear layer but the head, fp32, AdamW;
each step is forward (+ loss), backward, optimizer step, zero_grad. Target (issue #19): lorakit's DoRA
step <= 1.3x lorakit's LoRA step. PEFT's DoRA step is timed beside it (huggingface/peft#2651 reports ~2x).

    python -m benchmarks.dora_step [--quick] [--batch 4 --seq 128] [--rounds 3 --repeats 2] [--memory]
"""

from __future__ import annotations

import argparse
import copy
import json

import peft
import torch

import lorakit
from benchmarks.common import LLAMA_25M, LLAMA_SMALL, interleaved, llama, load_average, machine, ms, token_batch
from benchmarks.train_step import lorakit_loss, make_step, peak_memory, peft_loss

R = 16


def _lorakit(base, dora: bool):
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", use_dora=dora))
    return model.train()


def _peft(base, dora: bool):
    config = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", use_dora=dora)
    return peft.get_peft_model(copy.deepcopy(base), config).train()


def run(shape: dict, batch_size: int, seq: int, rounds: int, repeats: int) -> dict:
    base = llama(shape)
    batch = token_batch(shape["vocab_size"], batch_size, seq)
    fns = {"lorakit lora": make_step(_lorakit(base, False), batch, "fp32", lorakit_loss),
           "lorakit dora": make_step(_lorakit(base, True), batch, "fp32", lorakit_loss),
           "peft lora": make_step(_peft(base, False), batch, "fp32", peft_loss),
           "peft dora": make_step(_peft(base, True), batch, "fp32", peft_loss)}
    load_before = load_average()
    t = interleaved(fns, rounds=rounds, repeats=repeats, warmup=2)
    return {"times": t, "load": [load_before, load_average()],
            "dora_over_lora": t["lorakit dora"]["median"] / t["lorakit lora"]["median"],
            "peft_dora_over_peft_lora": t["peft dora"]["median"] / t["peft lora"]["median"],
            "peft_dora_over_lorakit_dora": t["peft dora"]["median"] / t["lorakit dora"]["median"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small model (a smoke run)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory", action="store_true",
                   help="also peak step memory above the model (each in a fresh process, benchmark 4's method)")
    args = p.parse_args()
    shape = LLAMA_SMALL if args.quick else LLAMA_25M
    result = run(shape, args.batch, args.seq, args.rounds, args.repeats)
    print(f"{machine()}; load average {result['load'][0]:.1f} -> {result['load'][1]:.1f}")
    print(f"{'25M' if shape is LLAMA_25M else 'small'} Llama, batch {args.batch}x{args.seq}, fp32, r={R} all-linear")
    for name, t in result["times"].items():
        print(f"  {name:14s} {ms(t)}")
    print(f"lorakit DoRA step / lorakit LoRA step: {result['dora_over_lora']:.2f}x (target <= 1.3x: "
          f"{'met' if result['dora_over_lora'] <= 1.3 else 'MISSED'})")
    print(f"PEFT DoRA step / PEFT LoRA step:       {result['peft_dora_over_peft_lora']:.2f}x")
    print(f"PEFT DoRA step / lorakit DoRA step:    {result['peft_dora_over_lorakit_dora']:.2f}x")
    if args.memory:
        peaks = {f"{which} {kind}": peak_memory(which, "fp32", shape, args.batch, args.seq, dora=kind == "dora")
                 for which in ("lorakit", "peft") for kind in ("lora", "dora")}
        for name, mb in peaks.items():
            print(f"  peak step memory above the model, {name:13s} {mb:7.1f} MB")
        print(f"lorakit DoRA / lorakit LoRA memory: {peaks['lorakit dora'] / peaks['lorakit lora']:.2f}x; "
              f"PEFT DoRA / lorakit DoRA: {peaks['peft dora'] / peaks['lorakit dora']:.2f}x")
        result["peak_mb"] = peaks
    print(json.dumps({k: v for k, v in result.items() if k != "times"}))


if __name__ == "__main__":
    main()
