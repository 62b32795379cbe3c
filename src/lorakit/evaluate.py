"""Perplexity of a model on data, for the base, the adapted model and the adapter at several scales.

    lorakit eval --adapter adapters/mine --data held_out.txt --scales 0,0.5,1,2 --json
    lorakit eval --base ~/models/big --quantize nf4 --adapter adapters/q --data held_out.txt   # 4-bit base

Perplexity = exp(mean negative log-likelihood per learned token), over the same rows for every
variant, so the numbers compare directly. Scale 0 is the base (computed with adapters disabled).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import disable_adapters, set_adapters
from lorakit.base import (autocast, base_option, default_device, dtype_option, load_base, quantize_option,
                          quantize_spec, resolve_dtype)
from lorakit.data import Example, collate, load_examples
from lorakit.errors import UserError
from lorakit.io import adapters_option, attach_adapters
from lorakit.losses import IGNORE
from lorakit.options import add_command, option
from lorakit.packed import check_settings, pack_for_inference


@torch.no_grad()
def mean_nll(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8,
             max_batches: int | None = None) -> tuple[float, int]:
    """(mean NLL per learned token, number of tokens) over the first max_batches batches."""
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    total, count = 0.0, 0
    batches = range(0, len(examples), batch_size)
    for b, start in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with autocast(device, dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=IGNORE, reduction="sum")
        total += nll.item()
        count += int((labels != IGNORE).sum())
    if count == 0:
        raise UserError("the evaluation data has no tokens to score; give it more text")
    return total / count, count


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 50.0))


@dataclass
class EvalConfig:
    """Everything `lorakit eval` takes; each field's help is its --help."""

    data: Path = option(".txt or .jsonl file to score")
    adapters: list[str] = adapters_option("to mix several")
    base: str | None = base_option()
    scales: str | None = option("also score the adapter mix at these scales, e.g. 0,0.5,1,2", default=None)
    seq_len: int = option("tokens per scored row", default=256)
    batch_size: int = option("rows per forward pass", default=8)
    max_batches: int | None = option("score at most this many batches", default=50)
    dtype: str = dtype_option()
    quantize: str | None = quantize_option()
    json: bool = option("print the result as JSON", default=False)

    def __post_init__(self) -> None:
        quantize_spec(self.quantize)  # --quantize checked


def evaluate(config: EvalConfig) -> dict:
    """Perplexity on `config.data` for the base, the adapted model, and each scale of the adapter mix."""
    for flag, value, low in (("--batch-size", config.batch_size, 1), ("--seq-len", config.seq_len, 2),
                             ("--max-batches", 1 if config.max_batches is None else config.max_batches, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    device = default_device()
    scales = _parse_scales(config.scales)
    check_settings()  # LORAKIT_PACKED_WEIGHTS / LORAKIT_ONEDNN_FP32, before the model loads
    model, tokenizer = load_base(config.base, dtype=resolve_dtype(config.dtype, device), device=device,
                                 quantize=quantize_spec(config.quantize))
    examples = load_examples(config.data, tokenizer, seq_len=min(config.seq_len, _max_len(model)), labels="all")[0]
    weights = attach_adapters(model, config.adapters) if config.adapters else {}
    pack_for_inference(model)  # where oneDNN's products are the faster ones: weights packed once (lorakit.packed)
    pad, size, most = tokenizer.pad_token_id, config.batch_size, config.max_batches
    with disable_adapters(model):
        base_nll, tokens = mean_nll(model, examples, pad, size, most)
    result = {"data": str(config.data), "tokens": tokens,
              "base": {"nll": base_nll, "perplexity": perplexity(base_nll)}}
    if weights:
        nll, _ = mean_nll(model, examples, pad, size, most)
        result["adapted"] = {"nll": nll, "perplexity": perplexity(nll), "adapters": weights}
        result["change"] = perplexity(nll) / perplexity(base_nll) - 1
    for scale in scales:
        set_adapters(model, {name: w * scale for name, w in weights.items()})
        if scale == 0:
            nll = base_nll  # exactly the base: every update is multiplied by zero
        else:
            nll, _ = mean_nll(model, examples, pad, size, most)
        result.setdefault("scales", []).append({"scale": scale, "nll": nll, "perplexity": perplexity(nll)})
    return result


def _max_len(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 1 << 30))


def _print_table(result: dict) -> None:
    print(f"{result['data']}: {result['tokens']:,} tokens scored")
    print(f"  base        perplexity {result['base']['perplexity']:10.3f}")
    if "adapted" in result:
        print(f"  adapted     perplexity {result['adapted']['perplexity']:10.3f}  ({100 * result['change']:+.1f}%)")
    for row in result.get("scales", []):
        print(f"  scale {row['scale']:<5g} perplexity {row['perplexity']:10.3f}")


def _parse_scales(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--scales must be comma-separated numbers like 0,0.5,1,2; got {text!r}") from None
    if not all(math.isfinite(s) for s in scales):
        raise UserError(f"--scales must be finite numbers, got {text!r}")
    return scales


def register(subparsers) -> None:
    add_command(subparsers, "eval", "perplexity of base vs adapted model on some data",
                "Perplexity on data for the base, the adapted model and chosen adapter scales.\n\n"
                "examples:\n  lorakit eval --adapter adapters/mine --data held_out.txt --scales 0,0.5,1,2 --json\n"
                "  lorakit eval --base ~/models/big --quantize nf4 --adapter adapters/q --data held_out.txt",
                _run, EvalConfig)


def _run(config: EvalConfig) -> None:
    result = evaluate(config)
    if config.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
