"""`lorakit generate`: sample text with one or several adapters at chosen scales, streamed.

    lorakit generate --adapter adapters/mine --prompt "The ship" --compare     # base vs adapted
    lorakit generate --adapter adapters/a:1.0 --adapter adapters/b:0.5 --prompt "..."
    lorakit generate --base ~/models/big --quantize nf4 --adapter adapters/q --prompt "..."  # 4-bit base

With --compare the base and the adapted model sample with the same seed, so the random draws are
the same and every difference in the text comes from the adapter.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapters import disable_adapters
from lorakit.base import (autocast, base_option, default_device, dtype_option, load_base, quantize_option,
                          quantize_spec, resolve_decode_dtype)
from lorakit.data import render_chat_prompt
from lorakit.errors import UserError
from lorakit.io import adapters_option, attach_adapters
from lorakit.options import add_command, option
from lorakit.packed import check_settings, pack_for_inference


# Below this temperature sampling is greedy (vLLM's threshold): dividing logits by 1e-45 overflows float32,
# and the distribution is one-hot to float precision long before.
GREEDY_BELOW = 1e-5


@dataclass
class Sampling:
    """How each next token is chosen; each field's help is `lorakit generate`'s --help."""

    max_new_tokens: int = option("tokens to generate at most", default=80)
    temperature: float = option("sampling temperature", default=0.8)
    top_k: int = option("sample among the k likeliest tokens; 0: off", default=50)
    top_p: float = option("nucleus sampling mass", default=0.95)
    seed: int = option("random seed", default=0)
    greedy: bool = option("always take the likeliest token", default=False)
    stop_at_eos: bool = option("keep going past the end-of-text token", default=True)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or (not self.greedy and self.temperature <= 0):
            raise UserError(f"--temperature must be a positive number (or use --greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        if self.temperature < GREEDY_BELOW:
            self.greedy = True


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Pick a token from the last position's logits (V,) by greedy or temperature/top-k/top-p sampling."""
    logits = logits.float()
    if sampling.greedy:
        return int(logits.argmax())
    # Everything below stays in log space until one softmax over what is kept: the top token always
    # survives each cut, so the kept set is never empty and nothing divides by a zero sum (a top_p of
    # 1e-300 is 0 in float32, and would otherwise drop every token).
    logits = logits / sampling.temperature  # temperature >= GREEDY_BELOW: finite
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        drop = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # keep the smallest set reaching top_p
        drop[0] = False
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def stream_tokens(model: nn.Module, input_ids: list[int], sampling: Sampling, eos_id: int | None,
                  base: bool = False) -> Iterator[int]:
    """Yield new token ids one by one (KV cache; `base=True` runs with adapters disabled)."""
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    generator = torch.Generator().manual_seed(sampling.seed)
    max_len = getattr(model.config, "max_position_embeddings", None)
    ids = torch.tensor([input_ids], device=device)
    cache = None  # transformers' KV cache (its `cache` argument, 5.24 on; `past_key_values` before)
    for i in range(sampling.max_new_tokens):
        if max_len is not None and len(input_ids) + i >= max_len:
            return
        with torch.no_grad(), autocast(device, dtype), (disable_adapters(model) if base else nullcontext()):
            out = model(input_ids=ids, cache=cache, use_cache=True)
        cache = out.cache
        token = next_token(out.logits[0, -1], sampling, generator)
        if sampling.stop_at_eos and token == eos_id:
            return
        yield token
        ids = torch.tensor([[token]], device=device)


def stream_text(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Decode a token stream into text pieces, holding back incomplete UTF-8 characters."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text


@dataclass
class GenerateConfig:
    """What `lorakit generate` takes besides `Sampling`; each field's help is its --help."""

    prompt: str = option("text to continue")
    adapters: list[str] = adapters_option("to mix several")
    base: str | None = base_option()
    compare: bool = option("also show the base's output, same seed", default=False)
    chat: bool = option("wrap the prompt as a user turn of a chat", default=False)
    dtype: str = dtype_option()
    quantize: str | None = quantize_option()

    def __post_init__(self) -> None:
        if not self.prompt:
            raise UserError("--prompt is empty; give the model some text to continue")
        quantize_spec(self.quantize)  # --quantize checked


def generate(config: GenerateConfig, sampling: Sampling | None = None, out=None) -> dict[str, str]:
    """Generate from the prompt with the adapters at their scales; stream to `out`; return the texts."""
    sampling = sampling or Sampling()
    out = out or sys.stdout
    device = default_device()
    check_settings()  # LORAKIT_PACKED_WEIGHTS / LORAKIT_ONEDNN_FP32, before the model loads
    dtype = resolve_decode_dtype(config.dtype, device, config.base, quantize=config.quantize)
    model, tokenizer = load_base(config.base, dtype=dtype, device=device,
                                 quantize=quantize_spec(config.quantize))
    weights = attach_adapters(model, config.adapters) if config.adapters else {}
    pack_for_inference(model)  # where oneDNN's products are the faster ones: weights packed once (lorakit.packed)
    if config.compare and not weights:
        raise UserError("--compare needs at least one --adapter to compare against the base")
    chat, prompt = config.chat, config.prompt
    text = render_chat_prompt([{"role": "user", "content": prompt}], tokenizer) if chat else prompt
    # a tokenizer's own chat template writes the start token into the text already (as in training)
    specials = not (chat and getattr(tokenizer, "chat_template", None))
    input_ids = tokenizer(text, add_special_tokens=specials).input_ids
    label = " + ".join(f"{n}:{w:g}" for n, w in weights.items()) or "base"
    runs = {"base": True, label: False} if config.compare else {label: not weights}
    results = {}
    for name, use_base in runs.items():
        if config.compare:
            print(f"── {name} " + "─" * max(0, 60 - len(name)), file=out)
        print(prompt if not chat else f"[user] {prompt}\n[assistant] ", end="", file=out, flush=True)
        pieces = []
        for piece in stream_text(tokenizer, stream_tokens(model, input_ids, sampling, tokenizer.eos_token_id,
                                                          base=use_base)):
            pieces.append(piece)
            print(piece, end="", file=out, flush=True)
        print("\n", file=out, flush=True)
        results[name] = "".join(pieces)
    return results


def register(subparsers) -> None:
    add_command(subparsers, "generate", "sample text with adapters at chosen scales (streamed)",
                "Sample text with one or several adapters at chosen scales, streamed.\n\nexamples:\n"
                '  lorakit generate --adapter adapters/mine --prompt "The ship" --compare\n'
                '  lorakit generate --adapter adapters/a:1.0 --adapter adapters/b:0.5 --prompt "..."\n'
                '  lorakit generate --base ~/models/big --quantize nf4 --adapter adapters/q --prompt "..."',
                generate, GenerateConfig, Sampling)
