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

from lorakit import products
from lorakit.layers import LoraLayer
from lorakit.modules import output_head

IGNORE = -100  # label value the loss skips (PyTorch / transformers convention)

# Config fields that change the logits after the head; a model with one of them set takes the plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Fewest rows per chunk, whatever the vocabulary: each chunk reads the whole (V, d) head, and with
# fewer rows the head's matmul waits on memory, not arithmetic. Measured on a 2-core AVX2 CPU, fp32,
# 2048 rows at a 151,936-token vocabulary (Qwen2), loss and gradient: 13 rows per chunk 42 s,
# 64 rows 17-19 s, 256 rows 10-12 s, 512 rows 9-10 s. 256 rows of such logits are 155 MB in fp32.
MIN_ROWS = 256


CHUNK_ELEMENTS = 1 << 21  # logits per chunk by default (8 MB in fp32), raised to MIN_ROWS rows


def _rows(chunk_elements: int | None, vocab: int) -> int:
    """Rows of logits per chunk: by default CHUNK_ELEMENTS of them but at least MIN_ROWS rows; a
    given `chunk_elements` is a hard bound (at least one row)."""
    if chunk_elements is None:
        return max(MIN_ROWS, CHUNK_ELEMENTS // vocab)
    return max(1, chunk_elements // vocab)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_elements: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not IGNORE, as `model(**batch).loss`.

    Works for transformers causal LMs whose head is a plain Linear after the body's last hidden
    state (Llama, Qwen2, GPT-2, ...; tied or untied), also with a LoRA adapter on it (its weight plus
    the adapter's update is one (V, d) matrix, as small as the head itself). Anything else, e.g. a head
    whose adapter draws dropout or a model that rescales its logits, falls back to `model(**batch).loss`.
    `chunk_elements` bounds the logits held at once (rows x vocabulary); by default that is
    CHUNK_ELEMENTS but never fewer than MIN_ROWS rows, where the head's matmul stays fast.
    """
    body, weight, bias = _body_and_head(model)
    if body is None:
        return model(**batch).loss
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
    # Position t predicts label t+1: shift the labels, not the hidden state (no copy of it).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)  # (B*T,)
    rows = _rows(chunk_elements, weight.shape[0])
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets, rows)


def _body_and_head(model: nn.Module) -> tuple[nn.Module | None, torch.Tensor | None, torch.Tensor | None]:
    """(body giving last_hidden_state, the head's weight (V, d) and bias), or Nones where that split is not safe."""
    head = output_head(model)
    body = getattr(model, "base_model", model)
    config = getattr(model, "config", None)
    if body is model or config is None:
        return None, None, None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None, None, None
    if type(head) is nn.Linear:
        return body, head.weight, head.bias
    if isinstance(head, LoraLayer) and (weight := head.dense_weight()) is not None:
        return body, weight, head.base.bias
    return None, None, None


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
            logits = products.linear(h, weight, bias).to(acc)  # (n, V): the only vocabulary-sized tensors
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
                grad_h.index_copy_(0, index, products.grad_input(p, weight).to(grad_h.dtype))  # (n, d)
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


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunk_elements: int | None = None) -> torch.Tensor:
    """log p(label_{t+1} | tokens up to t) at every position whose next label is not IGNORE, else 0: (B, T-1).

    The per-token log-probabilities that preference objectives sum over a completion, computed like
    `causal_lm_loss`: chunk by chunk from the last hidden state, never the (B, T, V) logits. Position t
    of the result scores label t+1 (as TRL's per-token log-probs). Falls back to the model's logits
    where the hidden-state split is not safe (see `causal_lm_loss`).
    """
    labels = batch["labels"]  # (B, T)
    targets = labels[:, 1:]  # (B, T-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    body, weight, bias = _body_and_head(model)
    if body is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        logp = torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
        return logp.masked_fill(targets == IGNORE, 0.0)
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, d)
    # Shift the labels, not the hidden state (no copy of it): the last position scores nothing.
    shifted = F.pad(targets, (0, 1), value=IGNORE).reshape(-1)  # (B*T,)
    rows = _rows(chunk_elements, weight.shape[0])
    flat = LinearLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, shifted, rows)  # (B*T,)
    return flat.view(labels.shape)[:, :-1]


class LinearLogProbs(torch.autograd.Function):
    """log_softmax(h·Wᵀ + b)[target] per row (0 where target is IGNORE), chunk by chunk.

    Arguments: hidden (N, d); weight (V, d); bias (V,) or None; targets (N,); rows per chunk.
    The upstream gradient of each row is only known in the backward, so the forward keeps
    d logp/d h = (onehot - softmax)·W per learned row, (n, d), and the backward scales it: no (N, V)
    tensor is kept. A trainable head (rare with LoRA) is recomputed chunk by chunk in the backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        keep = (targets != IGNORE).nonzero().squeeze(1)  # (n,) rows that carry a label
        acc = torch.promote_types(hidden.dtype, torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        out = torch.zeros(targets.shape, dtype=acc, device=hidden.device)  # (N,)
        grad_h = hidden.new_empty((keep.numel(), hidden.shape[1])) if need_h else None  # (n, d)
        for start in range(0, keep.numel(), rows):
            index = keep[start:start + rows]  # (c,)
            t = targets.index_select(0, index)  # (c,)
            logits = products.linear(hidden.index_select(0, index), weight, bias)  # (c, V)
            logp = torch.log_softmax(logits.to(acc), dim=1)  # (c, V)
            del logits
            out.index_copy_(0, index, logp.gather(1, t[:, None]).squeeze(1))
            if need_h:
                # d logp[t] / d logits = onehot(t) - softmax, formed in place in the log-probabilities' buffer.
                p = logp.exp_().neg_()  # (c, V)
                p.scatter_add_(1, t[:, None], p.new_ones((len(t), 1)))
                grad = products.grad_input(p.to(weight.dtype), weight)  # (c, d)
                grad_h[start:start + len(index)] = grad.to(hidden.dtype)
        ctx.rows, ctx.dtype = rows, hidden.dtype
        ctx.save_for_backward(keep, grad_h, targets, *((hidden, weight, bias) if need_w or need_b else ()))
        return out

    @staticmethod
    def backward(ctx, g):
        keep, grad_h, targets, *head_inputs = ctx.saved_tensors
        g_keep = g.index_select(0, keep)  # (n,) upstream gradient of each learned row
        d_hidden = None
        if grad_h is not None:
            d_hidden = torch.zeros((g.shape[0], grad_h.shape[1]), dtype=ctx.dtype, device=g.device)  # (N, d)
            d_hidden.index_copy_(0, keep, (grad_h * g_keep[:, None].to(grad_h.dtype)))
        d_weight = d_bias = None
        if head_inputs:
            hidden, weight, bias = head_inputs
            d_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            d_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
            for start in range(0, keep.numel(), ctx.rows):
                index = keep[start:start + ctx.rows]  # (c,)
                h = hidden.index_select(0, index)  # (c, d)
                t = targets.index_select(0, index)
                p = torch.softmax(products.linear(h, weight, bias).float(), dim=1).neg_()  # (c, V)
                p.scatter_add_(1, t[:, None], p.new_ones((len(t), 1)))
                p *= g_keep[start:start + len(index), None].float()  # (c, V): d loss / d logits
                if d_weight is not None:
                    d_weight.addmm_(p.t(), h.float())  # (V, d)
                if d_bias is not None:
                    d_bias += p.sum(0)
            d_weight = None if d_weight is None else d_weight.to(weight.dtype)
            d_bias = None if d_bias is None else d_bias.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None
