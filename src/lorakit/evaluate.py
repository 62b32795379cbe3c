"""Perplexity of a model on data, for the base, the adapted model and the adapter at several scales.

    lorakit eval --adapter adapters/mine --data held_out.txt --scales 0,0.5,1,2 --json

Perplexity = exp(mean negative log-likelihood per learned token), over the same rows for every
variant, so the numbers compare directly. Scale 0 is the base (computed with adapters disabled).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.base import attach_adapters, autocast, default_device, load_base, resolve_dtype
from lorakit.data import IGNORE, Example, collate, load_examples
from lorakit.errors import UserError
from lorakit.adapters import disable_adapters, set_adapters


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


def evaluate(data: Path, adapters: list[str], base: str | None = None, scales: list[float] | None = None,
             seq_len: int = 256, batch_size: int = 8, max_batches: int | None = 50,
             dtype: str = "auto") -> dict:
    """Perplexity on `data` for the base, the adapted model, and each scale of the adapter mix."""
    device = default_device()
    model, tokenizer = load_base(base, dtype=resolve_dtype(dtype, device), device=device)
    examples, stats = load_examples(data, tokenizer, seq_len=min(seq_len, _max_len(model)), labels="all")
    weights = attach_adapters(model, adapters) if adapters else {}
    with disable_adapters(model):
        base_nll, tokens = mean_nll(model, examples, tokenizer.pad_token_id, batch_size, max_batches)
    result = {"data": str(data), "tokens": tokens, "base": {"nll": base_nll, "perplexity": perplexity(base_nll)}}
    if weights:
        nll, _ = mean_nll(model, examples, tokenizer.pad_token_id, batch_size, max_batches)
        result["adapted"] = {"nll": nll, "perplexity": perplexity(nll), "adapters": weights}
        result["change"] = perplexity(nll) / perplexity(base_nll) - 1
    for scale in scales or []:
        set_adapters(model, {name: w * scale for name, w in weights.items()})
        if scale == 0:
            nll = base_nll  # exactly the base: every update is multiplied by zero
        else:
            nll, _ = mean_nll(model, examples, tokenizer.pad_token_id, batch_size, max_batches)
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
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--scales must be comma-separated numbers like 0,0.5,1,2; got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="perplexity of base vs adapted model on some data",
        description="Perplexity on data for the base, the adapted model and chosen adapter scales.\n\n"
                    "example:\n  lorakit eval --adapter adapters/mine --data held_out.txt --scales 0,0.5,1,2 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help=".txt or .jsonl file to score")
    p.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                   help="adapter directory, optionally with a scale; repeat to mix several")
    p.add_argument("--base", help="base model directory or hub id (default: the embedded base)")
    p.add_argument("--scales", help="also score the adapter mix at these scales, e.g. 0,0.5,1,2")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per scored row (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--max-batches", type=int, default=50, help="score at most this many batches (default 50)")
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 (default auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(args) -> int:
        result = evaluate(args.data, args.adapter, base=args.base, scales=_parse_scales(args.scales),
                          seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.max_batches,
                          dtype=args.dtype)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_table(result)
        return 0

    p.set_defaults(func=run)
