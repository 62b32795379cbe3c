"""The fused fast path: a frozen base linear plus its LoRA updates as one autograd Function.

    y = x·Wᵀ + b + Σᵢ sᵢ·(dropᵢ(x)·Aᵢᵀ)·Bᵢᵀ          W frozen: (out, in);  Aᵢ (r, in);  Bᵢ (out, r)

Run as plain autograd ops this costs up to ~2x a bare linear here, most of it in what autograd keeps
and computes for the backward. `FusedLoraLinear` keeps and computes only what LoRA's backward needs.
`LoraLayer` takes this path for a frozen plain Linear / Conv1D / NF4 base that no hook watches
(`fusable`); `lorakit.mlp` builds on `fused_forward` / `fused_backward` for a gated MLP's down_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import products
from lorakit.modules import Conv1D
from lorakit.nf4 import NF4Linear, NF4Tensor, nf4_grad_input, nf4_linear

FUSABLE_BASES = (nn.Linear, NF4Linear, Conv1D) if Conv1D else (nn.Linear, NF4Linear)


def fusable(base: nn.Module) -> bool:
    """Whether `base` can run inside `FusedLoraLinear`: exactly a Linear / Conv1D / NF4Linear (no subclass,
    whose forward might differ), frozen, and watched by no forward hook (nearly always)."""
    if type(base) not in FUSABLE_BASES:  # a PackedLinear too: its own forward, for inference
        return False
    frozen = type(base) is NF4Linear or not base.weight.requires_grad  # NF4: no weight parameter at all
    return frozen and not base._forward_hooks and not base._forward_pre_hooks


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the fused path runs in: what autocast would cast to inside the ops, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class FusedLoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + Σᵢ sᵢ·(dropᵢ(x)·Aᵢᵀ)·Bᵢᵀ for a frozen W, with a backward that does only what LoRA needs.

    - saves x once, the small (N, r) products, and for an adapter with dropout its mask as bytes (the
      dropped-out input is recomputed from x and the mask), nothing of size (N, out);
    - computes no gradient for the frozen W, and adds the adapters' input gradient into g·W in place;
    - adds the update into the base output in place, and scales (N, r) tensors, never (N, out) ones.
    Every temporary is (N, r) or (r, in) / (out, r), or an adapter's dropped-out or cast (N, in) input.
    Dropout draws its mask as `F.dropout` does on a CPU: a seeded run drops the same elements.

    Arguments: x (N, in); weight (out, in), a tensor in x's dtype or an `NF4Tensor`; bias (out,) or
    None; then per adapter (tuples) the scale sᵢ, the dropout probability (0: none) and the dtype the
    down projection runs in; then per adapter Aᵢ (r, in) in that dtype and Bᵢ (out, r) in x's dtype
    (`LoraLayer.fused_args` builds them).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, drops, downs, *weights):
        y, masks, hs = fused_forward(x, weight, bias, scales, drops, downs, weights)
        ctx.scales, ctx.drops, ctx.downs = scales, drops, downs
        ctx.save_for_backward(x if scales else None, stash_weight(ctx, weight), *weights, *masks, *hs)
        return y

    @staticmethod
    def backward(ctx, g):  # g: (N, out)
        x, weight, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        weights, masks, hs = rest[:2 * n], rest[2 * n:3 * n], rest[3 * n:]
        needs = ctx.needs_input_grad
        grad_x, grad_bias, grads = fused_backward(g, x, unstash_weight(ctx, weight), weights, masks, hs,
                                                  ctx.scales, ctx.drops, needs[0], needs[2], needs[6:])
        return grad_x, None, grad_bias, None, None, None, *grads


def fused_forward(x, weight, bias, scales, drops, downs, weights) -> tuple[torch.Tensor, list, list]:
    """`FusedLoraLinear`'s forward: (y (N, out), each adapter's dropout mask or None, each (N, r) product)."""
    y = (products.linear(x, weight, bias) if isinstance(weight, torch.Tensor)
         else nf4_linear(x, weight, bias))  # (N, out)
    masks, hs = [], []
    for i, s in enumerate(scales):
        A, B = weights[2 * i], weights[2 * i + 1]
        noise = mask = None
        if drops[i]:
            noise = torch.empty_like(x).bernoulli_(1 - drops[i]).div_(1 - drops[i])  # (N, in): 0 or 1/(1-p)
            mask = noise != 0  # kept as one byte per element instead of the dropped-out input
        h = _adapter_input(x, noise, A.dtype) @ A.t()  # (N, r)
        h = h.mul_(s).to(y.dtype)  # (N, r): s applied at rank r
        y.addmm_(h, B.t())  # (N, out), in place: no (N, out) temporary
        masks.append(mask)
        hs.append(h)
    return y, masks, hs


def fused_backward(g, x, weight, weights, masks, hs, scales, drops, need_x: bool, need_bias: bool,
                   needs) -> tuple:
    """`FusedLoraLinear`'s backward: (grad x, grad bias, [grad Aᵢ, grad Bᵢ per adapter]).

    `needs` holds two flags per adapter (Aᵢ, Bᵢ), as `ctx.needs_input_grad` orders them.
    """
    grad_x = None  # (N, in); no gradient for the frozen W
    if need_x:
        grad_x = products.grad_input(g, weight) if isinstance(weight, torch.Tensor) else nf4_grad_input(g, weight)
    grad_bias = g.sum(0) if need_bias else None  # (out,)
    grads = []
    for i, s in enumerate(scales):
        A, B, mask, h = weights[2 * i], weights[2 * i + 1], masks[i], hs[i]
        need_A, need_B = needs[2 * i: 2 * i + 2]
        grad_A = grad_B = None
        if need_B:
            grad_B = g.t() @ h  # (out, r); h already carries s
        if need_A or need_x:
            gh = (g @ B).mul_(s).to(A.dtype)  # (N, r): the gradient at A's output
            noise = None if mask is None else mask.to(x.dtype).div_(1 - drops[i])  # the forward's, exactly
            if need_x and noise is None and A.dtype == x.dtype:
                grad_x.addmm_(gh, A)  # (N, in), in place into g·W
            elif need_x:  # back through the cast and the dropout, as autograd would
                grad_x += _dropped((gh @ A).to(x.dtype), noise)
            if need_A:
                grad_A = gh.t() @ _adapter_input(x, noise, A.dtype)  # (r, in)
        grads += [grad_A, grad_B]
    return grad_x, grad_bias, grads


def _adapter_input(x: torch.Tensor, noise: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """What an adapter's A reads: x dropped out (x·noise, as `F.dropout` computes it) and cast to A's dtype."""
    return _dropped(x, noise).to(dtype)


def _dropped(t: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    return t if noise is None else t * noise


def stash_weight(ctx, weight: torch.Tensor | NF4Tensor) -> torch.Tensor | None:
    """What to pass to save_for_backward for the base weight: a dense one itself; an NF4 one (not a
    tensor) rides on ctx instead. `unstash_weight` gives it back in the backward."""
    ctx.nf4 = None if isinstance(weight, torch.Tensor) else weight
    return weight if ctx.nf4 is None else None


def unstash_weight(ctx, saved: torch.Tensor | None) -> torch.Tensor | NF4Tensor:
    return saved if ctx.nf4 is None else ctx.nf4
