"""Benchmark 8: one decode step of the serving engine, a batch of 8 rows on 8 different adapters.

The engine's own step (routing, one batched forward with the KV cache, greedy pick) on the ~25M
Llama-shaped model with 8 rank-16 adapters on every linear but the head, 8 prompts of 64 tokens:
- mixed: row i uses adapter a_i (the gathered per-row product of `lorakit.routing`);
- single: every row uses a0 (the same per-row path, one adapter);
- base: every row uses no adapter.
The three engines step in turn (each its own batch and cache), so load on the shared machine hits
all alike. Target: mixed <= 1.1x single. The engine is driven step by step through its private
`_admit` / `_step`, without its thread, to time exactly one step.
"""

from __future__ import annotations

import statistics
import time

import torch

import lorakit
from benchmarks.common import LLAMA_25M, LLAMA_SMALL, llama
from benchmarks.inference import ADAPTERS, _config, _randomize
from lorakit.serve.engine import Engine, GenerationRequest

PROMPT = 64


def _model(shape: dict):
    model = llama(shape)
    for i in range(ADAPTERS):
        lorakit.inject(model, _config(), adapter=f"a{i}")
        _randomize(lorakit.adapter_state_dict(model, f"a{i}").values(), seed=i)
    return model.eval()


def _engine(model, mixes: list[dict[str, float]], vocab: int) -> Engine:
    engine = Engine(model, eos_id=None, max_batch=len(mixes))
    g = torch.Generator().manual_seed(0)
    requests = [GenerationRequest(torch.randint(0, vocab, (PROMPT,), generator=g).tolist(), mix, max_tokens=10 ** 6,
                                  emit=lambda token, finish: None, temperature=0.0) for mix in mixes]
    engine._admit(requests)
    return engine


def run(steps: int = 120, quick: bool = False) -> list[dict]:
    shape = LLAMA_SMALL if quick else LLAMA_25M
    steps = 20 if quick else steps
    model = _model(shape)
    rows = ADAPTERS
    engines = {
        "mixed": _engine(model, [{f"a{i}": 1.0} for i in range(rows)], shape["vocab_size"]),
        "single": _engine(model, [{"a0": 1.0}] * rows, shape["vocab_size"]),
        "base": _engine(model, [{}] * rows, shape["vocab_size"]),
    }
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for step in range(steps + 5):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine._step()
            if step >= 5:  # warm-up: the first steps build the stacks and the gather indices
                samples[name].append(time.perf_counter() - start)
    t = {name: {"median": statistics.median(s), "min": min(s), "max": max(s)} for name, s in samples.items()}
    mixed = t["mixed"]["median"] / t["single"]["median"]
    setup = f"{'25M' if shape is LLAMA_25M else 'small'} model, {rows} rows, prompts of {PROMPT}, r=16, fp32"
    return [{"id": 8, "benchmark": "serving decode step: 8 rows on 8 adapters / on one adapter",
             "lorakit": t["mixed"], "single": t["single"], "base": t["base"], "value": mixed, "unit": "x single",
             "target": "<= 1.1x", "met": mixed <= 1.1, "setup": setup}]
