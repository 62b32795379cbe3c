"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT 0.21 defines it, for `LoraLayer`.

A DoRA adapter carries a magnitude m (out,) beside its A (r, in) and B (out, r). Its layer's weight is

    W' = f ⊙ (W + s·B·A)        f = m / n,  n = ‖W + s·B·A‖ per output feature (a row of the (out, in) W)

with n a constant to autograd (detached: the paper's section 4.3, PEFT's choice). For an input x,
with y0 = x·Wᵀ the base's output before its bias b:

    y = b + f ⊙ (y0 + s·x·Aᵀ·Bᵀ)  =  base(x) + (f - 1) ⊙ y0 + f ⊙ s·B·A·x

"Output feature" is a row of W in the (out, in) layout for every base: a Linear's row, a column of
GPT-2's (in, out) Conv1D weight, and for an Embedding one embedding dimension over the vocabulary.

Several adapters at weights w (`set_adapters`) map the running output r (its bias aside) in turn, in
their order, as PEFT's layers do with several active adapters:

    LoRA:  r ← r + w·s·B·A·x
    DoRA:  r ← r + w·((f - 1) ⊙ r + f ⊙ s·B·A·x)            (w = 1: r ← f ⊙ (r + s·B·A·x))

w scales an adapter's effect on the output linearly: 0 is off, 1 is the adapter as trained (PEFT's
`rescale_adapter_scale` instead scales s, also inside n, so its scale 0 is not the base). Merging folds
the same maps into W in the same order, each n computed from the unmerged W. In training with dropout
PEFT's DoRA term reads the dropped-out input for its base part too: (f - 1) ⊙ drop(x)·Wᵀ + f ⊙ s·B·A·drop(x).

n is computed without forming W + s·B·A (out, in):

    n² = ‖W‖²_rows + 2s·rowsum(B ⊙ (W·Aᵀ)) + s²·rowsum(B ⊙ (B·(A·Aᵀ)))

‖W‖²_rows once per base weight (W is frozen; kept in `DoraCache`), then W·Aᵀ (out, r), which costs
what a forward of r tokens does, and (r, r) / (out, r) products. As precise as the direct norm in
fp32 (both ~1e-7 relative). Without autograd (inference) f is kept per adapter until A, B, m or W change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import products
from lorakit.fused import stash_weight, unstash_weight
from lorakit.nf4 import NF4Linear, NF4Tensor, nf4_grad_input, nf4_linear
from lorakit.packed import PackedLinear


class DoraLayer(Protocol):
    """What these functions read of a LoRA layer (`lorakit.layers.LoraLayer` has it)."""

    kind: str
    base: nn.Module
    lora_A: nn.ParameterDict  # name -> (r, in)
    lora_B: nn.ParameterDict  # name -> (out, r)
    lora_magnitude: nn.ParameterDict  # name -> (out,)
    scaling: dict[str, float]
    dora_cache: DoraCache

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor | NF4Tensor: ...

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    def dropping(self, name: str) -> bool: ...


@dataclass
class DoraCache:
    """What DoRA keeps between forwards of one layer: ‖W‖²_rows, and each adapter's f for inference.

    Each value is stored with the key of what it was computed from (storage and version counters of
    W, A, B, m), so a merge, an optimizer step or a copy into the weights makes it stale at once.
    """

    rows: tuple[tuple, torch.Tensor] | None = None  # (W's key, ‖W‖² per row (out,) fp32)
    scales: dict[str, tuple[tuple, torch.Tensor]] = field(default_factory=dict)  # name -> (key, f (out,))


def _key(*tensors: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def _weight_key(layer: DoraLayer) -> tuple:
    base = layer.base
    if isinstance(base, PackedLinear):  # an opaque tensor: its layer and how often it was set
        return id(base), base.version
    return _key(base.packed, base.absmax) if isinstance(base, NF4Linear) else _key(base.weight)


# -- the norm ---------------------------------------------------------------------------------------


@torch.no_grad()
def row_norms_sq(layer: DoraLayer) -> torch.Tensor:
    """‖W‖² of each output feature of the base weight, (out,) fp32; computed once per base weight."""
    key = _weight_key(layer)
    cache = layer.dora_cache
    if cache.rows is None or cache.rows[0] != key:
        W = layer.base_weight()
        if isinstance(W, NF4Tensor):  # a chunk of rows at a time: never the whole dequantized weight
            absmax = W.block_absmax()
            step = max(1, (1 << 22) // W.shape[1])
            sq = torch.cat([W.rows(i, min(i + step, W.shape[0]), torch.float32, absmax).square().sum(1)
                            for i in range(0, W.shape[0], step)])
        else:
            sq = torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).square()  # (out,)
        cache.rows = (key, sq)
    return cache.rows[1]


@torch.no_grad()
def weight_norm(layer: DoraLayer, name: str) -> torch.Tensor:
    """n = ‖W + s·B·A‖ per output feature, (out,) fp32, from ‖W‖²_rows and rank-r products (no (out, in) sum)."""
    A, B, s = layer.lora_A[name].float(), layer.lora_B[name].float(), layer.scaling[name]  # (r, in), (out, r)
    W = layer.base_weight()
    if isinstance(W, NF4Tensor):
        WA = nf4_linear(A.to(W.dtype), W, None).float()  # (r, out) = (W·Aᵀ)ᵀ, W dequantized a chunk at a time
    else:
        WA = F.linear(A.to(W.dtype), W).float()  # (r, out)
    cross = (B * WA.t()).sum(1)  # (out,): <W_o, (B·A)_o>
    own = (B * (B @ (A @ A.t()))).sum(1)  # (out,): ‖(B·A)_o‖²
    return (row_norms_sq(layer) + 2 * s * cross + s * s * own).clamp_min_(0).sqrt_()  # (out,)


def scale(layer: DoraLayer, name: str) -> torch.Tensor:
    """f = m / n (out,) fp32: differentiable in m (n is a constant); kept between inference forwards."""
    m = layer.lora_magnitude[name]
    if torch.is_grad_enabled() and m.requires_grad:
        return m / divisor(weight_norm(layer, name))
    key = (_weight_key(layer), _key(layer.lora_A[name], layer.lora_B[name], m), layer.scaling[name])
    cached = layer.dora_cache.scales.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = layer.dora_cache.scales[name] = (key, m.float() / divisor(weight_norm(layer, name)))
    return cached[1]


def divisor(n: torch.Tensor) -> torch.Tensor:
    """n with its zeros made 1. A row of zeros in W + s·B·A (a tied head's padding row: m = n = 0 at init) has
    no direction to rescale and gives zeros whatever f is; PEFT's 0/0 there is NaN, which spreads through every
    logit. Dividing by 1 instead gives f = m (0: the row stays the base's, and gets no gradient while m is 0)."""
    return torch.where(n > 0, n, torch.ones_like(n))


@torch.no_grad()
def init_magnitude(layer: DoraLayer, name: str) -> None:
    """m = ‖W + s·B·A‖ (PEFT's init): the adapter starts as W + s·B·A, which B = 0 makes the base."""
    layer.lora_magnitude[name].copy_(weight_norm(layer, name))


# -- forward ----------------------------------------------------------------------------------------


def add(layer: DoraLayer, x: torch.Tensor, result: torch.Tensor, name: str, weight: float) -> torch.Tensor:
    """The running output `result` (with the base's bias) mapped by DoRA adapter `name` at `weight`, by
    plain autograd ops (any base, several adapters, dropout, weight ≠ 1)."""
    f = scale(layer, name).to(result.dtype)  # (out,)
    A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name] * weight
    if layer.kind == "embedding":  # no bias and no dropout (as PEFT)
        h = F.embedding(x, A.t(), padding_idx=layer.base.padding_idx, max_norm=layer.base.max_norm,
                        norm_type=layer.base.norm_type, scale_grad_by_freq=layer.base.scale_grad_by_freq,
                        sparse=layer.base.sparse)  # (..., r)
        before = result  # (..., out)
    elif layer.dropping(name):
        x = layer.dropout[name](x)  # one mask for both parts, as PEFT
        before = layer.base_matmul(x.to(result.dtype))  # (..., out): drop(x)·Wᵀ
        h = F.linear(x.to(A.dtype), A)  # (..., r)
    else:
        bias = layer.base.bias
        before = result if bias is None else result - bias.to(result.dtype)  # (..., out): x·Wᵀ
        h = F.linear(x.to(A.dtype), A)  # (..., r)
    update = (h * s).to(result.dtype) @ B.to(result.dtype).t()  # (..., out): w·s·B·A·x, scaled at rank r
    return result + (f - 1) * weight * before + f * update


class FusedDoraLinear(torch.autograd.Function):
    """y = f ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b for one DoRA adapter at weight 1 on a frozen W, no dropout.

    Keeps x, the (N, r) product and the output y itself (which the next op nearly always keeps too),
    nothing else of size (N, out): the magnitude's gradient Σ_N g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) / n is read off
    y as Σ_N g ⊙ (y - b) / m, since y - b = f ⊙ (...) and f·n = m. No gradient for W, none through n.

    Arguments: x (N, in); weight (out, in) in x's dtype or an `NF4Tensor`; bias (out,) or None; s; n (out,)
    fp32; m (out,) fp32; A (r, in) in the down projection's dtype; B (out, r) in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, s, n, m, A, B):
        y = products.linear(x, weight) if isinstance(weight, torch.Tensor) else nf4_linear(x, weight, None)  # (N, out)
        h = (x.to(A.dtype) @ A.t()).mul_(s).to(y.dtype)  # (N, r): s applied at rank r
        y.addmm_(h, B.t())  # (N, out): x·Wᵀ + s·x·Aᵀ·Bᵀ, in place
        f = m.detach() / n  # (out,) fp32
        y.mul_(f.to(y.dtype))
        if bias is not None:
            y.add_(bias)
        ctx.s = s
        ctx.save_for_backward(x, stash_weight(ctx, weight), bias, n, m, A, B, h, y)
        return y

    @staticmethod
    def backward(ctx, g):  # g: (N, out)
        x, weight, bias, n, m, A, B, h, y = ctx.saved_tensors
        weight = unstash_weight(ctx, weight)
        m = m.detach().float()
        need_x, need_m, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 5, 6, 7))
        grad_x = grad_m = grad_A = grad_B = None
        if need_m:
            # Σ_N g ⊙ (y - b) / m, accumulated in fp32; rows with m = 0 carry no direction in y: recompute those
            dot = torch.linalg.vecdot(g, y, dim=0).float()  # (out,)
            if bias is not None:
                dot -= bias.float() * g.sum(0, dtype=torch.float32)
            grad_m = dot / m
            dead = (m == 0).nonzero().flatten()
            if dead.numel():
                grad_m[dead] = _direction_dot(g, x, weight, h, B, dead) / n[dead]
        gf = g * (m / n).to(g.dtype)  # (N, out): the gradient at the direction's output
        if need_B:
            grad_B = gf.t() @ h  # (out, r); h carries s
        if need_x:
            grad_x = products.grad_input(gf, weight) if isinstance(weight, torch.Tensor) else nf4_grad_input(gf, weight)
        if need_A or need_x:
            gh = (gf @ B).mul_(ctx.s).to(A.dtype)  # (N, r): the gradient at A's output
            if need_x and A.dtype == x.dtype:
                grad_x.addmm_(gh, A)  # (N, in), in place
            elif need_x:
                grad_x += (gh @ A).to(x.dtype)
            if need_A:
                grad_A = gh.t() @ x.to(A.dtype)  # (r, in)
        return grad_x, None, None, None, None, grad_m, grad_A, grad_B


def _direction_dot(g, x, weight, h, B, rows) -> torch.Tensor:
    """Σ_N g ⊙ (x·Wᵀ + h·Bᵀ) for the output features `rows` alone, fp32."""
    W = weight[rows] if isinstance(weight, torch.Tensor) else weight.dequantize(x.dtype)[rows]  # (k, in)
    direction = x @ W.t() + h @ B[rows].t()  # (N, k)
    return torch.linalg.vecdot(g[:, rows], direction, dim=0).float()


def fused(layer: DoraLayer, x: torch.Tensor, name: str, dtype: torch.dtype, autocast: bool) -> torch.Tensor:
    """`FusedDoraLinear` for adapter `name` on x (N, in) in `dtype`; A's dtype follows the LoRA fused path."""
    A, B, m = layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude[name]
    down = dtype if autocast else A.dtype
    W = layer.base_weight(dtype)
    bias = layer.base.bias
    return FusedDoraLinear.apply(x, W, None if bias is None else bias.to(dtype), layer.scaling[name],
                                 divisor(weight_norm(layer, name)), m, A.to(down), B.to(dtype))


# -- merge ------------------------------------------------------------------------------------------


@torch.no_grad()
def merged_weight(W: torch.Tensor, delta: torch.Tensor, f: torch.Tensor, weight: float) -> torch.Tensor:
    """W (out, in) fp32 with DoRA's map at `weight` folded in: (1 + w(f - 1)) ⊙ W + w·f ⊙ ΔW (ΔW = s·B·A)."""
    keep = 1 + weight * (f - 1)  # (out,)
    return keep[:, None] * W + (weight * f)[:, None] * delta


@torch.no_grad()
def unmerged_weight(W: torch.Tensor, delta: torch.Tensor, f: torch.Tensor, weight: float) -> torch.Tensor:
    """The inverse of `merged_weight`, with the f used when merging."""
    keep = 1 + weight * (f - 1)  # (out,)
    return (W - (weight * f)[:, None] * delta) / keep[:, None]
