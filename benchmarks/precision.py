"""bf16 against fp32 on this CPU, path by path: is `--dtype bf16` ever slower where `auto` picks it?

1. `lorakit train` on the embedded base (batch 8x256), fp32 then bf16, alternating rounds, for each
   training path: LoRA, DoRA, QLoRA (NF4 base), activation checkpointing, full fine-tune, dropout.
   Tokens/s is the median over the steps after the first two (from metrics.jsonl).
2. Greedy decoding, one row with a KV cache (what `lorakit generate` runs), and a 4x128 no-grad
   prefill: fp32 and bf16, each with plain weights and as the inference commands load it (weights packed
   by `lorakit.packed`: bf16 where oneDNN runs it on AMX / AVX-512-BF16, fp32 where fp32 products go to
   oneDNN), base alone and with an r=16 all-linear adapter; the ratio is bf16 as loaded over fp32 as
   loaded (what `--dtype` gives a user). `--base PATH` adds a real-shaped base (e.g. the Qwen2-0.5B shape that
   `benchmarks/scale.py --only train --build` caches).

Usage: python benchmarks/precision.py [--only train,decode] [--rounds 2] [--base PATH ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "src" / "lorakit" / "assets" / "corpora" / "kjv" / "train.txt"
TRAIN_PATHS = {"LoRA": [], "DoRA": ["--dora"], "QLoRA (NF4)": ["--quantize", "nf4"],
               "activation checkpointing": ["--activation-checkpointing"], "full fine-tune": ["--full"],
               "dropout 0.1": ["--dropout", "0.1"]}


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none of avx2/avx512"


def train_tokens_per_s(extra: list[str], dtype: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "lorakit", "train", "--data", str(CORPUS), "--out", str(out),
                        "--steps", str(steps), "--batch-size", "8", "--seq-len", "256", "--dtype", dtype, "--quiet",
                        *extra], check=True, capture_output=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median([r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:])


def bench_train(rounds: int, steps: int) -> None:
    print(f"\n1. lorakit train, embedded base, batch 8x256, {steps} steps: tokens/s (median of steps 3..)")
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, extra in TRAIN_PATHS.items():
            for dtype in ("fp32", "bf16"):
                samples.setdefault((name, dtype), []).append(train_tokens_per_s(extra, dtype, steps))
    print(f"| path | fp32 | bf16 | bf16 / fp32 |\n|---|---|---|---|")
    for name in TRAIN_PATHS:
        fp32, bf16 = (statistics.median(samples[(name, d)]) for d in ("fp32", "bf16"))
        print(f"| {name} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f}x |")


def _models(base: str | None, adapter: bool):
    import lorakit
    from lorakit.base import load_base
    from lorakit.packed import pack_for_inference

    models = {}
    for name, dtype, pack in (("fp32 plain", torch.float32, False), ("fp32 (as loaded)", torch.float32, True),
                              ("bf16 plain", torch.bfloat16, False), ("bf16 (as loaded)", torch.bfloat16, True)):
        model, tokenizer = load_base(base, dtype=dtype)
        if adapter:
            lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
            with torch.no_grad():
                for _, layer in lorakit.lora_layers(model):
                    layer.lora_B["default"].normal_(0, 0.01)
        if pack:
            pack_for_inference(model)
        models[name] = model.eval()
    return models, tokenizer


def bench_decode(bases: list[str | None], rounds: int, tokens: int) -> None:
    from lorakit.base import autocast
    from lorakit.generate import Sampling, stream_tokens

    print(f"\n2. decoding: greedy, 1 row, {tokens} new tokens (tokens/s); prefill 4x128 no-grad (tokens/s)")
    print("| base | adapter | fp32 plain decode | fp32 as loaded | bf16 plain | bf16 as loaded | bf16 / fp32 "
          "(as loaded) | fp32 prefill | fp32 as loaded | bf16 plain | bf16 as loaded |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for base in bases:
        for adapter in (False, True):
            models, tokenizer = _models(base, adapter)
            ids = tokenizer("The captain saw the red sky and said").input_ids
            sampling = Sampling(max_new_tokens=tokens, greedy=True, stop_at_eos=False)
            batch = torch.randint(3, min(4000, tokenizer.vocab_size), (4, 128),
                                  generator=torch.Generator().manual_seed(0))
            decode: dict[str, list[float]] = {}
            prefill: dict[str, list[float]] = {}
            for _ in range(rounds + 1):  # the first round warms up and is dropped
                for name, model in models.items():
                    start = time.perf_counter()
                    n = len(list(stream_tokens(model, ids, sampling, None)))
                    decode.setdefault(name, []).append(n / (time.perf_counter() - start))
                    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
                    start = time.perf_counter()
                    with torch.no_grad(), autocast(torch.device("cpu"), dtype):
                        model(input_ids=batch)
                    prefill.setdefault(name, []).append(batch.numel() / (time.perf_counter() - start))
            d = {k: statistics.median(v[1:]) for k, v in decode.items()}
            p = {k: statistics.median(v[1:]) for k, v in prefill.items()}
            label = base or "embedded"
            fp32, bf16 = d["fp32 (as loaded)"], d["bf16 (as loaded)"]
            print(f"| {label} | {'r=16 all-linear' if adapter else 'none'} | {d['fp32 plain']:,.1f} | {fp32:,.1f} "
                  f"| {d['bf16 plain']:,.1f} | {bf16:,.1f} | {bf16 / fp32:.2f}x | {p['fp32 plain']:,.0f} "
                  f"| {p['fp32 (as loaded)']:,.0f} | {p['bf16 plain']:,.0f} | {p['bf16 (as loaded)']:,.0f} |", flush=True)
            del models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="train,decode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per decode run")
    parser.add_argument("--base", action="append", default=[], help="also decode with this base (repeatable)")
    a = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    only = set(a.only.split(","))
    if "train" in only:
        bench_train(a.rounds, a.steps)
    if "decode" in only:
        bench_decode([None, *a.base], a.rounds, a.tokens)


if __name__ == "__main__":
    main()
