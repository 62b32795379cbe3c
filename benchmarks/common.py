"""Timing helpers shared by the benchmarks: medians over repeats after warm-up, and the machine."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeats: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median / min / max seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5, repeats: int = 10,
                warmup: int = 3) -> dict[str, dict[str, float]]:
    """Time several functions in alternating rounds, so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t)} for name, t in samples.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load_average() -> float:
    """The 1-minute load average: on a shared machine, timings mean little when it is above the core count."""
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


def summarize(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def ms(t: dict[str, float]) -> str:
    """'123.4 ms (min 120.1, max 130.2)' for a timing dict in seconds."""
    return f"{t['median'] * 1e3:.1f} ms (min {t['min'] * 1e3:.1f}, max {t['max'] * 1e3:.1f})"


# -- the benchmark model ---------------------------------------------------------------------------

# A Llama-shaped model of ~25M parameters (19M in the decoder, 4.2M each in embedding and head).
LLAMA_25M = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                 tie_word_embeddings=False)
# The same architecture at a size where bf16 steps are bearable on a CPU without fast bf16 matmuls.
LLAMA_SMALL = dict(LLAMA_25M, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)


def llama(shape: dict | None = None, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of `shape` (default LLAMA_25M), fp32, eval mode, no download."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(shape or LLAMA_25M)))
    model.config.use_cache = False
    return model.eval()


def token_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows (no padding): input_ids, attention_mask, labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def forward_flops_per_token(model, seq: int) -> float:
    """Matmul FLOPs of one forward per token: 2 per linear weight, plus attention's QKᵀ and AV (full, not causal-halved)."""
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * linear + 4 * cfg.num_hidden_layers * seq * cfg.hidden_size


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """The machine's measured fp32 matmul rate (FLOP/s) at n x n x n: the denominator of MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timed(lambda: a @ b, repeats=repeats, warmup=2)
    return 2 * n ** 3 / t["min"]
