"""The causal-LM training loss without full-size logits.

`model(**batch).loss` in transformers forms the (batch, seq, vocab) logits, upcasts them to fp32 and
keeps them (and the softmax) for the backward: for 8x256 tokens and a 32k vocabulary that is
hundreds of MB, often the largest tensor in a LoRA step. `causal_lm_loss` takes the model's last
hidden state instead and, chunk by chunk, computes the logits, the loss and at once the gradient at
the hidden state, so only one chunk of logits ever exists and the backward is a multiply.

    loss = causal_lm_loss(model, batch)       # same value and gradients as model(**batch).loss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.modules import output_head

IGNORE = -100  # label value the loss skips (PyTorch / transformers convention)

# Config fields that change the logits after the head; a model with one of them set takes the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_elements: int = 1 << 21) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not IGNORE, as `model(**batch).loss`.

    Works for transformers causal LMs whose head is a plain Linear after the body's last hidden
    state (Llama, Qwen2, GPT-2, ...; tied or untied). Anything else, e.g. a head with its own
    adapter or a model that rescales its logits, falls back to `model(**batch).loss`.
    `chunk_elements` bounds the logits held at once (rows x vocabulary).
    """
    body, head = _body_and_head(model)
    if body is None:
        return model(**batch).loss
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
    # Position t predicts label t+1: shift the labels, not the hidden state (no copy of it).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)  # (B*T,)
    rows = max(1, chunk_elements // head.out_features)
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets, rows)


def _body_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Linear | None]:
    """(body giving last_hidden_state, plain Linear head), or (None, None) where that split is not safe."""
    head = output_head(model)
    body = getattr(model, "base_model", model)
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or body is model or config is None:
        return None, None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None, None
    return body, head


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h·Wᵀ + b, targets) over targets != IGNORE, with gradients computed in the forward, chunk by chunk.

    Arguments: hidden (N, d); weight (V, d); bias (V,) or None; targets (N,); rows per chunk.
    Saves the gradients (N, d) [and (V, d), (V,) if the head trains], never (N, V) logits. Rows whose
    target is IGNORE (padding, prompts, each row's last position) get no logits at all.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        keep = (targets != IGNORE).nonzero().squeeze(1)  # (n,) rows that carry loss
        count = keep.numel()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least, as transformers upcasts
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, d); ignored rows get zero
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None  # (V, d)
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None  # (V,)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, count, rows):
            index = keep[start:start + rows]  # (n,)
            h = hidden.index_select(0, index)  # (n, d)
            t = targets.index_select(0, index)  # (n,)
            logits = F.linear(h, weight, bias).to(acc)  # (n, V): the only vocabulary-sized tensors
            logp = torch.log_softmax(logits, dim=1)  # (n, V); one fused pass, no max/exp/sum temporaries
            del logits
            total -= logp.gather(1, t[:, None]).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(CE)/d(logits) = softmax - onehot, formed in place in the log-probabilities' buffer.
            p = logp.exp_()  # (n, V)
            p.scatter_add_(1, t[:, None], p.new_full((len(t), 1), -1.0))
            p = p.to(weight.dtype)
            if need_h:
                grad_h.index_copy_(0, index, (p @ weight).to(grad_h.dtype))  # (n, d)
            if need_w:
                grad_w.addmm_(p.t().to(acc), h.to(acc))  # (V, d)
            if need_b:
                grad_b += p.to(acc).sum(0)  # (V,)
        ctx.count = count
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total / count

    @staticmethod
    def backward(ctx, g):
        scale = g / ctx.count  # the forward's gradients are of the summed loss
        grads = [None if t is None else (t * scale).to(dtype) for t, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None
