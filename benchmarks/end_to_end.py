"""Benchmark 7: `lorakit train` end to end (the Python call behind the CLI) on the embedded base.

Reports the median tokens/s of the training steps after the first (from metrics.jsonl), the whole
run's tokens/s as lorakit reports it, and the MFU: achieved matmul FLOP/s over the machine's measured
fp32 matmul rate. FLOPs per token of a LoRA step are counted as 2x the forward's (forward, plus a
backward through the activations only; the frozen base needs no weight gradients).
If the embedded base is not built yet, a random model of its shape with its own tokenizer stands in.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import matmul_peak
from lorakit.base import CORPORA, EMBEDDED_BASE

# The embedded base's shape (scripts/base_train.py): Llama, tied embeddings.
EMBEDDED_SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True)


def stand_in_base(directory: Path, text: str) -> Path:
    """A random Llama of the embedded base's shape, with a byte-level BPE tokenizer trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=EMBEDDED_SHAPE["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(**EMBEDDED_SHAPE, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)  # stored in bf16, as the real one
    return directory


def run(steps: int = 12, quick: bool = False) -> list[dict]:
    from lorakit.base import load_base
    from lorakit.train import TrainConfig, train

    data = CORPORA / "devil" / "train.txt"
    steps = 3 if quick else steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (EMBEDDED_BASE / "config.json").is_file():
            base, which = None, "embedded base"
        else:
            base, which = str(stand_in_base(tmp / "base", data.read_text())), "stand-in of the embedded base's shape (not built yet)"
        config = TrainConfig(data=data, out=tmp / "out", base=base, steps=steps, quiet=True,
                             checkpoint_every=10 ** 6)
        start = time.perf_counter()
        summary = train(config)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
        model, _ = load_base(base, dtype=torch.float32, device=torch.device("cpu"))
    seq = summary["config"]["seq_len"] or 256
    per_step = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]
    tokens_per_s = statistics.median(per_step)
    from benchmarks.common import forward_flops_per_token

    flops_per_token = 2 * forward_flops_per_token(model, seq)
    peak = matmul_peak()
    mfu = tokens_per_s * flops_per_token / peak
    return [{"id": 7, "benchmark": f"lorakit train end to end ({which})", "value": tokens_per_s, "unit": "tokens/s",
             "run_tokens_per_s": summary["tokens_per_s"], "wall_s": wall, "steps": steps,
             "mfu": mfu, "peak_gflops": peak / 1e9, "achieved_gflops": tokens_per_s * flops_per_token / 1e9,
             "target": "report tokens/s and MFU", "met": None,
             "setup": f"batch {config.batch_size}x{seq}, dtype auto, {steps} steps, {data.parent.name}/{data.name}"}]
