"""Peak memory of `lorakit gguf` on a larger random Llama: does the export stream tensor by tensor?

    .venv/bin/python benchmarks/gguf_memory.py            # ~540 MB fp32 model, a few minutes
    .venv/bin/python benchmarks/gguf_memory.py --quick    # ~60 MB model

Each export runs in a fresh process that first imports everything it will use (and loads a tokenizer
once, which loads transformers' tokenizer code), then resets its peak
RSS (/proc/self/clear_refs); the number is how far the peak (VmHWM) rose above the RSS at that point, set against the model's size and its largest
tensor. `lorakit merge` of the same model and adapter (which loads the whole base) is measured the
same way, as the in-memory reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # a Llama with an untied head, so the two largest tensors are the embedding and the head
    "full": dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=4),
    "quick": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2),
}

CHILD = r"""
import json, sys, time
import numpy, torch, transformers, gguf, gguf.quants, safetensors
from transformers import AutoTokenizer, AutoModelForCausalLM, PreTrainedTokenizerFast
import lorakit.gguf, lorakit.algebra, lorakit.export, lorakit.gguf_vocab, lorakit.cli

from lorakit.base import EMBEDDED_BASE
lorakit.gguf_vocab.read_vocab(EMBEDDED_BASE, 8192)  # loads the tokenizer code (tens of MB of modules)


def status(key):  # kB -> MB (10^6 bytes)
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024 / 1e6

with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
before = status("VmRSS")
start = time.perf_counter()
code = lorakit.cli.main(json.loads(sys.argv[1]))
seconds = time.perf_counter() - start
print(json.dumps({"code": code, "baseline_mb": before, "peak_mb": status("VmHWM"), "seconds": seconds}))
"""


def build(directory: Path, shape: dict) -> tuple[int, int]:
    """Save a random Llama (+ the embedded tokenizer, resized) and an all-linear r=16 adapter."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.base import EMBEDDED_BASE

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory / "base")
    tok = AutoTokenizer.from_pretrained(EMBEDDED_BASE)  # 8192 tokens; the rest of the vocab is padding
    tok.save_pretrained(directory / "base")
    largest = max(p.numel() * 4 for p in model.parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             base_model_name_or_path=str(directory / "base")))
    with torch.no_grad():
        for p in lorakit.adapter_state_dict(model).values():
            p.normal_(0, 0.02)
    lorakit.save_adapter(model, directory / "adapter")
    return total, largest


def measure(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["growth_mb"] = result["peak_mb"] - result["baseline_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        total, largest = build(d, SHAPES["quick" if args.quick else "full"])
        base, adapter = str(d / "base"), str(d / "adapter")
        runs = {
            "gguf base f32": ["gguf", "--base", base, "--out", str(d / "f32.gguf"), "--type", "f32"],
            "gguf base q8_0": ["gguf", "--base", base, "--out", str(d / "q8.gguf"), "--type", "q8_0"],
            "gguf merged f32": ["gguf", "--base", base, "--adapter", adapter, "--out", str(d / "m.gguf"),
                                "--type", "f32"],
            "gguf adapter": ["gguf", "--adapter", adapter, "--out", str(d / "a.gguf")],
            "merge (in memory, reference)": ["merge", "--base", base, "--adapter", adapter, "--out", str(d / "m")],
        }
        print(f"model: {total / 1e6:.0f} MB fp32, largest tensor {largest / 1e6:.1f} MB")
        print(f"{'run':32} {'peak growth MB':>15} {'x largest':>10} {'x model':>8} {'s':>6}")
        for name, argv in runs.items():
            r = measure(argv)
            assert r["code"] == 0, (name, r)
            print(f"{name:32} {r['growth_mb']:15.0f} {r['growth_mb'] * 1e6 / largest:10.2f} "
                  f"{r['growth_mb'] * 1e6 / total:8.2f} {r['seconds']:6.1f}")


if __name__ == "__main__":
    main()
