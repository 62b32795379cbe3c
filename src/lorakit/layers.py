"""The LoRA math: one wrapper around a frozen Linear, GPT-2 Conv1D or Embedding.

    y = base(x) + Σ_adapters  w · s · B(A(dropout(x)))        s = alpha / r  (or alpha / sqrt(r))

`lora_A` is (r, in) and `lora_B` is (out, r) for every kind of base (for an Embedding, "in" is the
vocabulary and "out" the embedding width), the shapes PEFT writes to disk. A layer can hold several
adapters; `active` maps the names in use to the user's weight for each. `merge()` folds the active
adapters into the base weight and `unmerge()` takes them out again; nothing merges as a side effect.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.nf4 import NF4Linear, NF4Tensor, nf4_grad_input, nf4_linear

try:  # transformers' GPT-2 style linear with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    Conv1D = ()


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' or 'embedding' for a base LoRA can wrap, else None."""
    if isinstance(module, (nn.Linear, NF4Linear)):  # an NF4 base is a Linear whose weight is stored in 4 bits
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


class LoraLayer(nn.Module):
    """A frozen base layer plus any number of named low-rank updates."""

    def __init__(self, base: nn.Module):
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(f"LoRA cannot wrap {type(base).__name__}; supported: Linear, Conv1D, Embedding")
        self.base = base
        self.kind = kind
        if kind == "linear":
            self.in_features, self.out_features = base.in_features, base.out_features
        elif kind == "conv1d":  # weight is (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.dropout = nn.ModuleDict()  # name -> nn.Dropout, only for adapters with p > 0
        self.scaling: dict[str, float] = {}
        self.active: dict[str, float] = {}  # adapters in use -> user weight
        self.merged: dict[str, float] = {}  # adapters folded into base.weight -> weight used
        self.disabled = False
        # per-row routing for a mixed batch: row i uses a name, a {name: weight} mix, or None (base)
        self.row_adapters: list[str | dict[str, float] | None] | None = None

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: bool | str | None) -> None:
        base_dtype, device = self._base_dtype_device()
        # Adapter weights are fp32 masters even on a bf16/fp16 base: small, and precise to update.
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        A = torch.empty(r, self.in_features, dtype=dtype, device=device)
        B = torch.empty(self.out_features, r, dtype=dtype, device=device)
        if init is not None:  # None: the caller copies saved weights in next, so no init to throw away
            _init_lora(A, B, init, embedding=self.kind == "embedding", r=r)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self._forget_routing()  # the per-row stack no longer holds every adapter
        self.scaling[name] = scaling
        if dropout > 0:  # p = 0 needs no module at all: no copy of x, and less to walk over in the model
            drop = nn.Dropout(dropout)
            drop.training = self.training  # a new module defaults to training mode; follow the model
            self.dropout[name] = drop

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base; unmerge before deleting it")
        for table in (self.lora_A, self.lora_B):
            del table[name]
        self._forget_routing()  # frees the stacked copy of the removed adapter at once
        if name in self.dropout:
            del self.dropout[name]
        self.scaling.pop(name)
        self.active.pop(name, None)

    def _base_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The base weight's dtype and device (an NF4 base's compute dtype; its weight is not dequantized)."""
        if isinstance(self.base, NF4Linear):
            return self.base.dtype, self.base.packed.device
        return self.base.weight.dtype, self.base.weight.device

    def _dropping(self, name: str) -> bool:
        """Whether adapter `name` drops out inputs right now (p > 0 and training mode)."""
        return name in self.dropout and self.dropout[name].training

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        if self.row_adapters is not None:
            return self._add_per_row(x, self.base(x))
        names = self.running()
        if not names:
            return self.base(x)
        if self._fusable() and not torch.compiler.is_compiling():  # compiled: plain ops, which inductor fuses
            return self._fused(x, names)
        result = self.base(x)  # (..., out)
        for name in names:
            result = self._add_update(x, result, name, self.active[name])
        return result

    def running(self) -> list[str]:
        """The adapters the forward applies: active, held by this layer, not merged into the base."""
        return [n for n in self.active if n in self.lora_A and n not in self.merged]

    def _fusable(self) -> bool:
        """The fast path covers a frozen, plain Linear/Conv1D/NF4 base that no hook watches (nearly always)."""
        base = self.base
        frozen = type(base) is NF4Linear or not base.weight.requires_grad  # NF4: no weight parameter at all
        return type(base) in _FUSABLE and frozen and not base._forward_hooks and not base._forward_pre_hooks

    def _fused(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """base(x) + Σ w·s·B(A(dropout(x))) through `LoraLinear`, which saves and computes only what LoRA needs."""
        dtype = self.compute_dtype(x)
        x2 = x.reshape(-1, self.in_features).to(dtype)  # (N, in)
        y = LoraLinear.apply(x2, *self.fused_args(names, dtype))
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the fused path runs in: what autocast would cast to inside the ops, else x's."""
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

    def fused_args(self, names: list[str], dtype: torch.dtype) -> tuple:
        """`LoraLinear`'s arguments after x (N, in) in `dtype`: weight, bias, then per adapter the scale,
        the dropout probability and the down projection's dtype (tuples), then (Aᵢ, Bᵢ) per adapter."""
        base = self.base
        if isinstance(base, NF4Linear):
            W = base.quantized  # (out, in) in NF4, dequantized into `dtype` chunk by chunk where it is used
        else:
            W = (base.weight if self.kind == "linear" else base.weight.t()).to(dtype)  # (out, in): a view for Conv1D
        autocast = torch.is_autocast_enabled(self._base_dtype_device()[1].type)
        bias = base.bias
        scales, drops, downs, weights = [], [], [], []
        for name in names:
            A, B = self.lora_A[name], self.lora_B[name]  # (r, in), (out, r)
            # The down projection runs in the adapter's precision (fp32 masters) unless autocast says
            # otherwise, as the unfused path did; the up projection in the base output's precision.
            down = dtype if autocast else A.dtype
            scales.append(self.scaling[name] * self.active[name])
            drops.append(self.dropout[name].p if self._dropping(name) else 0.0)
            downs.append(down)
            weights += [A.to(down), B.to(dtype)]
        return (W, None if bias is None else bias.to(dtype), tuple(scales), tuple(drops), tuple(downs), *weights)

    def _down(self, x: torch.Tensor, name: str, weight: float) -> torch.Tensor:
        """The scaled rank-r projection s·w·A(dropout(x)), shape (..., r)."""
        A = self.lora_A[name]
        if self.kind == "embedding":
            h = F.embedding(x, A.t(), padding_idx=self.base.padding_idx, max_norm=self.base.max_norm,
                            norm_type=self.base.norm_type, scale_grad_by_freq=self.base.scale_grad_by_freq,
                            sparse=self.base.sparse)  # (..., r)
        else:
            h = F.linear((self.dropout[name](x) if name in self.dropout else x).to(A.dtype), A)  # (..., r)
        # Scale the rank-r tensor, not the (..., out) one: r/out of the work and no full-size temporary.
        return h * (self.scaling[name] * weight)

    def _add_update(self, x: torch.Tensor, result: torch.Tensor, name: str, weight: float) -> torch.Tensor:
        """The general path (Embedding, a trainable or hooked base): plain autograd ops."""
        h = self._down(x, name, weight).to(result.dtype)  # (..., r)
        B = self.lora_B[name].to(result.dtype)  # (out, r)
        if self.kind == "embedding":
            return result + h @ B.t()  # (..., out)
        # One addmm gives the sum without a separate (..., out) product. Not in place: under autograd an
        # in-place add into a view of the output makes its backward copy the whole gradient.
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), B.t())  # (N, out)
        return out.view_as(result)

    def _add_per_row(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Row i of the batch gets its own mix: row_adapters[i] is a name (weight 1), {name: weight}, or None."""
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per-row adapters name {len(rows)} rows but the batch has {x.shape[0]}")
        # A server decodes many steps with the same routing list: work out the mixes once per list.
        # (Keyed on the list object, which the cache keeps alive; callers hand over a new list to re-route.)
        cached = self.__dict__.get("_mixes")
        if cached is None or cached[0] is not rows:
            mixes = [row_mix(spec, self.lora_A) for spec in rows]
            cached = (rows, mixes, list(dict.fromkeys(n for mix in mixes for n in mix)))
            self.__dict__["_mixes"] = cached
        _, mixes, names = cached
        if not names:
            return result
        if self.kind == "embedding" or any(self._dropping(n) for n in names):
            return self._add_per_row_loop(x, result, mixes, names)
        return self._add_per_row_gathered(x, result, mixes)

    def _forget_routing(self) -> None:
        for key in ("_stack", "_mixes", "_index"):
            self.__dict__.pop(key, None)

    def _add_per_row_gathered(self, x: torch.Tensor, result: torch.Tensor, mixes: list[dict[str, float]]) -> torch.Tensor:
        """BGMV-style: gather each row's A and B and do two batched matmuls, whatever the adapter count.

        The work is that of a single adapter (plus gathering a few rank-r matrices), where a loop
        over adapters would pay per adapter for its own small matmuls and a copy of the output. A
        row mixing k adapters gathers k slots, i.e. one adapter of the summed rank.
        """
        names, As, Bts = self._stacked()  # (1+n, r, in), (1+n, r, out): slot 0 is all zeros
        batch = len(mixes)
        cached = self.__dict__.get("_index")
        if cached is not None and cached[0] is mixes and cached[1] is As:  # same routing, same stack
            index_t, scale_t = cached[2:]
        else:
            slot = {n: i + 1 for i, n in enumerate(names)}
            k = max(1, max(len(m) for m in mixes))
            index = [[0] * k for _ in mixes]  # empty slots (and base-only rows) gather the zero slot: exact zeros
            scale = [[0.0] * k for _ in mixes]
            for row, mix in enumerate(mixes):
                for j, (name, weight) in enumerate(mix.items()):
                    index[row][j], scale[row][j] = slot[name], self.scaling[name] * weight
            index_t = torch.tensor(index, device=x.device)  # (batch, k)
            scale_t = torch.tensor(scale, dtype=As.dtype, device=x.device)  # (batch, k)
            self.__dict__["_index"] = (mixes, As, index_t, scale_t)
        k = index_t.shape[1]
        r, out = As.shape[1], self.out_features
        xb = x.reshape(batch, -1, self.in_features).to(As.dtype)  # (batch, L, in)
        A = As[index_t].reshape(batch, k * r, self.in_features)  # (batch, k·r, in)
        h = torch.bmm(xb, A.transpose(1, 2))  # (batch, L, k·r)
        h = (h.view(batch, -1, k, r) * scale_t.view(batch, 1, k, 1)).view(batch, -1, k * r)  # scaled at rank r
        Bt = Bts[index_t].reshape(batch, k * r, out).to(result.dtype)  # (batch, k·r, out)
        flat = result.reshape(batch, -1, out)  # (batch, L, out)
        if torch.is_grad_enabled():
            return torch.baddbmm(flat, h.to(result.dtype), Bt).view_as(result)
        return flat.baddbmm_(h.to(result.dtype), Bt).view_as(result)  # in place: inference makes no copy

    def _stacked(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Every adapter of this layer stacked behind a zero slot: (names, A (1+n, r, in), Bᵀ (1+n, r, out)),
        zero-padded to one rank.

        Inference reuses the stack until an adapter is added or removed or its weights are changed
        in place by ordinary ops (a server swapping adapters rebuilds it once per swap, not once per
        token; writes through `.data` bypass the version counter: call `add_adapter`/`delete_adapter`
        or drop `_stack`). Under autograd it is rebuilt so that gradients reach the parameters.
        """
        A, B = self.lora_A._parameters, self.lora_B._parameters  # the dicts themselves: no module lookups per name
        names = sorted(A)
        key = tuple((n, A[n].data_ptr(), A[n]._version, B[n].data_ptr(), B[n]._version) for n in names)
        cached = self.__dict__.get("_stack")
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return names, cached[1], cached[2]
        ranks = [self.rank(n) for n in names]
        zero = self.lora_A[names[0]].new_zeros(1, max(ranks), self.in_features), \
            self.lora_A[names[0]].new_zeros(1, max(ranks), self.out_features)
        if len(set(ranks)) == 1:
            As = torch.cat([zero[0], torch.stack([self.lora_A[n] for n in names])])  # (1+n, r, in)
            Bts = torch.cat([zero[1], torch.stack([self.lora_B[n].t() for n in names])])  # (1+n, r, out)
        else:
            As = zero[0].new_zeros(1 + len(names), max(ranks), self.in_features)
            Bts = zero[1].new_zeros(1 + len(names), max(ranks), self.out_features)
            for i, (n, r) in enumerate(zip(names, ranks), start=1):
                As[i, :r] = self.lora_A[n]
                Bts[i, :r] = self.lora_B[n].t()
        if not torch.is_grad_enabled():
            self.__dict__["_stack"] = (key, As, Bts)  # not a buffer: never saved, moved or counted
        return names, As, Bts

    def _add_per_row_loop(self, x: torch.Tensor, result: torch.Tensor, mixes: list[dict[str, float]],
                          names: list[str]) -> torch.Tensor:
        """One adapter at a time (Embedding bases, or dropout in training mode)."""
        for name in names:
            rows = [i for i, mix in enumerate(mixes) if name in mix]
            weights = torch.tensor([mixes[i][name] for i in rows], device=x.device)  # (n,)
            index = torch.tensor(rows, device=x.device)
            h = self._down(x.index_select(0, index), name, 1.0).to(result.dtype)  # (n, ..., r)
            h = h * weights.to(h.dtype).view(-1, *[1] * (h.dim() - 1))
            delta = h @ self.lora_B[name].to(result.dtype).t()  # (n, ..., out)
            result = result.index_add(0, index, delta)
        return result

    # -- merge --------------------------------------------------------------------------------

    def delta_weight(self, name: str, weight: float = 1.0) -> torch.Tensor:
        """w·s·B·A in fp32, laid out like base.weight ((out, in); (in, out) for Conv1D and Embedding)."""
        delta = (self.lora_B[name].float() @ self.lora_A[name].float()) * (self.scaling[name] * weight)
        return delta if self.kind == "linear" else delta.t()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every active, not yet merged adapter into base.weight."""
        for name, weight in self.active.items():
            if name in self.lora_A and name not in self.merged:
                self._shift_base(self.delta_weight(name, weight))
                self.merged[name] = weight

    @torch.no_grad()
    def unmerge(self) -> None:
        for name, weight in reversed(list(self.merged.items())):
            self._shift_base(-self.delta_weight(name, weight))
        self.merged.clear()

    def _shift_base(self, delta: torch.Tensor) -> None:
        if isinstance(self.base, NF4Linear):  # dequantize, add, re-quantize: lossy, so unmerge is only close
            self.base.add_to_weight(delta)
            return
        W = self.base.weight
        # Accumulate in fp32 so a bf16 base loses no more than one rounding.
        W.copy_((W.float() + delta.to(W.device)).to(W.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank(n)}" for n in self.lora_A)
        return f"kind={self.kind}, adapters=[{ranks}], active={list(self.active)}, merged={list(self.merged)}"


_FUSABLE = (nn.Linear, NF4Linear, Conv1D) if Conv1D else (nn.Linear, NF4Linear)


class LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + Σᵢ sᵢ·(dropᵢ(x)·Aᵢᵀ)·Bᵢᵀ for a frozen W, with a backward that does only what LoRA needs.

    Plain autograd over the same ops costs up to ~2x a bare linear here; this Function
    - saves x once, the small (N, r) products, and for an adapter with dropout its mask as bytes (the
      dropped-out input is recomputed from x and the mask), nothing of size (N, out);
    - computes no gradient for the frozen W, and adds the adapters' input gradient into g·W in place;
    - adds the update into the base output in place, and scales (N, r) tensors, never (N, out) ones.
    Every temporary is (N, r) or (r, in) / (out, r), or an adapter's dropped-out or cast (N, in) input.
    Dropout draws its mask as `F.dropout` does on a CPU: a seeded run drops the same elements.

    Arguments: x (N, in); weight (out, in), a tensor in x's dtype or an `NF4Tensor`; bias (out,) or
    None; then per adapter (tuples) the scale sᵢ, the dropout probability (0: none) and the dtype the
    down projection runs in; then per adapter Aᵢ (r, in) in that dtype and Bᵢ (out, r) in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, drops, downs, *weights):
        y, masks, hs = lora_linear_forward(x, weight, bias, scales, drops, downs, weights)
        ctx.scales, ctx.drops, ctx.downs = scales, drops, downs
        ctx.save_for_backward(x if scales else None, stash_weight(ctx, weight), *weights, *masks, *hs)
        return y

    @staticmethod
    def backward(ctx, g):  # g: (N, out)
        x, weight, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        weights, masks, hs = rest[:2 * n], rest[2 * n:3 * n], rest[3 * n:]
        needs = ctx.needs_input_grad
        grad_x, grad_bias, grads = lora_linear_backward(g, x, unstash_weight(ctx, weight), weights, masks, hs,
                                                        ctx.scales, ctx.drops, needs[0], needs[2], needs[6:])
        return grad_x, None, grad_bias, None, None, None, *grads


def lora_linear_forward(x, weight, bias, scales, drops, downs, weights) -> tuple[torch.Tensor, list, list]:
    """`LoraLinear`'s forward: (y (N, out), each adapter's dropout mask or None, each (N, r) product)."""
    y = F.linear(x, weight, bias) if isinstance(weight, torch.Tensor) else nf4_linear(x, weight, bias)  # (N, out)
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


def lora_linear_backward(g, x, weight, weights, masks, hs, scales, drops, need_x: bool, need_bias: bool,
                         needs) -> tuple:
    """`LoraLinear`'s backward: (grad x, grad bias, [grad Aᵢ, grad Bᵢ per adapter]).

    `needs` holds two flags per adapter (Aᵢ, Bᵢ), as `ctx.needs_input_grad` orders them.
    """
    grad_x = None  # (N, in); no gradient for the frozen W
    if need_x:
        grad_x = g @ weight if isinstance(weight, torch.Tensor) else nf4_grad_input(g, weight)
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


class SavedModule(nn.Module):
    """`modules_to_save`: a trainable full copy of a module per adapter; the original stays frozen."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.copies = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.base)

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        self.active.pop(name, None)

    def current(self) -> nn.Module:
        """The module in use: the first active adapter's copy, else the original."""
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.base

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)


def row_mix(spec: str | dict[str, float] | None, known) -> dict[str, float]:
    """A row's adapters as {name: weight}, keeping only those this layer holds ('a' means {'a': 1.0})."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {spec: 1.0} if spec in known else {}
    return {n: float(w) for n, w in spec.items() if n in known and w != 0}


def _init_lora(A: torch.Tensor, B: torch.Tensor, init: bool | str, embedding: bool, r: int) -> None:
    with torch.no_grad():
        if init is False and embedding:  # both random, as PEFT (the adapter is not a no-op)
            nn.init.normal_(A)
            nn.init.normal_(B)
        elif init is False:  # both random, like nn.Linear's default init
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        elif embedding:  # as PEFT/loralib: A zero, B normal, so the update starts at zero
            nn.init.zeros_(A)
            nn.init.normal_(B)
        else:  # B zero makes the injected model equal the base; A random so B gets gradients
            if init == "gaussian":
                nn.init.normal_(A, std=1 / r)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
