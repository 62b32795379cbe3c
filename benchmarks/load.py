"""Benchmark 6: load an adapter (~1M parameters) from disk and make it the active one, into a loaded model.

lorakit: `load_adapter` + `set_adapters`; PEFT: `PeftModel.load_adapter` + `set_adapter`, on the same
files (lorakit writes PEFT's layout). Each timed load is undone (adapter deleted) outside the timing.
The file is read from the page cache after the first load, as when serving.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from benchmarks.common import LLAMA_25M, LLAMA_SMALL, llama, summarize

R = 16


def run(rounds: int = 20, quick: bool = False) -> list[dict]:
    shape = LLAMA_SMALL if quick else LLAMA_25M
    base = llama(shape)
    config = lorakit.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear")
    with tempfile.TemporaryDirectory() as tmp:
        source = lorakit.inject(copy.deepcopy(base), config)
        with torch.no_grad():
            for p in lorakit.adapter_state_dict(source).values():
                p.normal_(0, 0.02)
        params = lorakit.trainable_parameters(source).trainable
        directory = lorakit.save_adapter(source, Path(tmp) / "adapter")

        ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear"))
        ours.eval()

        def ours_load():
            lorakit.load_adapter(ours, directory, adapter="x")
            lorakit.set_adapters(ours, "x")

        def ours_undo():
            lorakit.delete_adapter(ours, "x")

        import peft

        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=2 * R,
                                                                           target_modules="all-linear"))
        theirs.eval()

        def theirs_load():
            theirs.load_adapter(str(directory), adapter_name="x")
            theirs.set_adapter("x")

        def theirs_undo():
            theirs.set_adapter("default")
            theirs.delete_adapter("x")

        samples: dict[str, list[float]] = {"lorakit": [], "peft": []}
        pairs = {"lorakit": (ours_load, ours_undo), "peft": (theirs_load, theirs_undo)}
        for i in range(rounds + 2):  # two warm-up rounds, then alternate
            for name, (load, undo) in pairs.items():
                start = time.perf_counter()
                load()
                elapsed = time.perf_counter() - start
                undo()
                if i >= 2:
                    samples[name].append(elapsed)
    t = {name: summarize(times) for name, times in samples.items()}
    value = t["lorakit"]["median"] * 1e3
    return [{"id": 6, "benchmark": f"adapter load + activate ({params / 1e6:.2f}M params, safetensors)",
             "lorakit": t["lorakit"], "peft": t["peft"], "value": value, "unit": "ms",
             "peft_value": t["peft"]["median"] * 1e3, "target": "<= 10 ms", "met": value <= 10,
             "setup": f"{'25M' if shape is LLAMA_25M else 'small'} model in memory, file in page cache"}]
