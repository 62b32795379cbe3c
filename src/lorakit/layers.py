"""The LoRA layer: one wrapper around a frozen Linear, GPT-2 Conv1D or Embedding.

    y = base(x) + Σ_adapters  w · s · B(A(dropout(x)))        s = alpha / r  (or alpha / sqrt(r))

An adapter may also carry PEFT's `lora_bias` (a bias on B: + w·s·b) or be a DoRA adapter (a magnitude
per output feature; `lorakit.variants.dora` holds its maths and says how it composes with others).

`lora_A` is (r, in) and `lora_B` is (out, r) for every kind of base (for an Embedding, "in" is the
vocabulary and "out" the embedding width), the shapes PEFT writes to disk. A layer can hold several
adapters; `active` maps the names in use to the user's weight for each. `merge()` folds the active
adapters into the base weight and `unmerge()` takes them out again; nothing merges as a side effect.

The forward picks one of four paths: the fused autograd Function of `lorakit.fused` (plain LoRA
adapters on a frozen plain linear base, nearly always), DoRA's own (one DoRA adapter on such a base),
plain autograd ops (Embedding, a trainable or hooked base, anything else), or, inside
`lorakit.per_row_adapters`, the `lorakit.routing.RowRouting` that gives each batch row its own adapters.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import UserError
from lorakit.fused import FusedLoraLinear, compute_dtype, fusable
from lorakit.modules import Conv1D
from lorakit.nf4 import NF4Linear, NF4Tensor
from lorakit.packed import PackedLinear
from lorakit.routing import RowRouting
from lorakit.variants import dora
from lorakit.variants import init as variant_init


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' or 'embedding' for a base LoRA can wrap, else None."""
    # an NF4 base is a Linear whose weight is stored in 4 bits; a packed one, in oneDNN's layout (inference)
    if isinstance(module, (nn.Linear, NF4Linear, PackedLinear)):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(in, out) of a base LoRA can wrap: A is (r, in) and B (out, r); an Embedding's "in" is its vocabulary."""
    kind = base_kind(base)
    if kind == "linear":
        return base.in_features, base.out_features
    if kind == "conv1d":  # weight is (in, out)
        return tuple(base.weight.shape)
    return base.num_embeddings, base.embedding_dim


FEW_ROWS = 64  # inputs of at most this many rows take the inference path of `LoraLayer.add_update`
FRESH_OUTPUT = (nn.Linear, NF4Linear, PackedLinear)  # bases whose forward returns a new tensor every call


class LoraLayer(nn.Module):
    """A frozen base layer plus any number of named low-rank updates."""

    packable_children = ("base",)  # `lorakit.packed` may pack the base for inference (it reads it, never copies)

    def __init__(self, base: nn.Module):
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(f"LoRA cannot wrap {type(base).__name__}; supported: Linear, Conv1D, Embedding")
        self.base = base
        self.kind = kind
        self.in_features, self.out_features = layer_dims(base)
        self.lora_A = AdapterParameters()  # name -> (r, in)
        self.lora_B = AdapterParameters()  # name -> (out, r)
        self.lora_magnitude = AdapterParameters()  # name -> (out,), DoRA adapters only (PEFT's lora_magnitude_vector)
        self.lora_bias = AdapterParameters()  # name -> (out,), adapters with PEFT's lora_bias only
        self.dropout = AdapterModules()  # name -> nn.Dropout, only for adapters with p > 0
        self.scaling: dict[str, float] = {}
        self.active: dict[str, float] = {}  # adapters in use -> user weight
        self.merged: dict[str, float] = {}  # adapters folded into base.weight -> weight used
        self.merged_scales: dict[str, torch.Tensor] = {}  # merged DoRA adapters -> their f (out,), for unmerge
        self.untied_from: list[nn.Parameter] = []  # the weight shared with another module before `untie` (0 or 1)
        self.dora_cache = dora.DoraCache()  # ‖W‖²_rows and inference-time f of DoRA adapters
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA / OLoRA adapters -> A, B at init
        self.disabled = False
        # inside `per_row_adapters`: each batch row's own adapters (set and cleared by that context manager)
        self.routing: RowRouting | None = None
        self.revision = 0  # counts adapters added and deleted: what routing caches about them is stale once it moves

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: bool | str | None,
                    use_dora: bool = False, lora_bias: bool = False) -> None:
        """A new adapter. `init` None leaves the weights uninitialised (the caller copies saved ones in)."""
        base_dtype, device = self._base_dtype_device()
        if device.type == "meta":  # a skeleton's base (streamed merge reads it later); the adapter is real
            device = torch.device("cpu")
        # Adapter weights are fp32 masters even on a bf16/fp16 base: small, and precise to update.
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        A = torch.empty(r, self.in_features, dtype=dtype, device=device)
        B = torch.empty(self.out_features, r, dtype=dtype, device=device)
        self.revision += 1
        if init is not None:  # None: the caller copies saved weights in next, so no init to throw away
            _init_lora(A, B, init, embedding=self.kind == "embedding", r=r)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.scaling[name] = scaling
        if init is not None and variant_init.changes_base(init):  # PiSSA / OLoRA: A, B from W; W <- W - s·B·A
            self._init_from_weight(name, init)
        if dropout > 0:  # p = 0 needs no module at all: no copy of x, and less to walk over in the model
            drop = nn.Dropout(dropout)
            drop.training = self.training  # a new module defaults to training mode; follow the model
            self.dropout[name] = drop
        if lora_bias:  # zero at init, as PEFT's (B is a Linear with a bias it zeroes)
            self.lora_bias[name] = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        if use_dora:
            self.lora_magnitude[name] = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device))
            if init is not None:  # after A and B: m = ‖W + s·B·A‖
                dora.init_magnitude(self, name)

    @torch.no_grad()
    def _init_from_weight(self, name: str, init: str) -> None:
        """PiSSA / OLoRA: A and B from the base weight, which keeps the residual; the initial A, B are kept
        in `initial` for `lorakit.variants.init.convert` (the adapter for the original base)."""
        W = self._dense_weight()  # (out, in) fp32
        A, B = variant_init.from_weight(init, W, self.rank(name), self.scaling[name])
        self.lora_A[name].copy_(A)
        self.lora_B[name].copy_(B)
        W -= (self.scaling[name] * B) @ A  # (out, in); PEFT's order of operations, for the same residual
        self._set_base(W if self.kind == "linear" else W.t())
        self.initial[name] = variant_init.initial_state(self, name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base; unmerge before deleting it")
        if name in self.initial:  # PiSSA / OLoRA: give the base weight back the part the adapter took
            A0, B0 = self.initial.pop(name)
            with torch.no_grad():
                W = self._dense_weight() + (self.scaling[name] * B0) @ A0  # (out, in)
                self._set_base(W if self.kind == "linear" else W.t())
        self.revision += 1
        for table in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_bias, self.dropout):
            if name in table:
                del table[name]
        self.scaling.pop(name)
        self.active.pop(name, None)
        self.dora_cache.scales.pop(name, None)

    def _base_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The base weight's dtype and device (an NF4 base's compute dtype; its weight is not dequantized)."""
        if isinstance(self.base, (NF4Linear, PackedLinear)):
            return self.base.dtype, self.base.packed.device
        return self.base.weight.dtype, self.base.weight.device

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor | NF4Tensor:
        """The base weight in the (out, in) layout (a view for Conv1D and Embedding), cast to `dtype` when
        given; an NF4 base's `NF4Tensor` (dequantized where it is used)."""
        if isinstance(self.base, NF4Linear):
            return self.base.quantized
        W = self.base.weight if self.kind == "linear" else self.base.weight.t()  # (out, in)
        return W if dtype is None else W.to(dtype)

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ (..., out), the base's product without its bias, by autograd ops."""
        if isinstance(self.base, NF4Linear):
            y = self.base(x)  # (..., out)
            return y if self.base.bias is None else y - self.base.bias.to(y.dtype)
        return F.linear(x, self.base_weight(x.dtype))

    def plain(self, name: str) -> bool:
        """Whether adapter `name` is plain LoRA (no DoRA magnitude, no lora_bias)."""
        return name not in self.lora_magnitude and name not in self.lora_bias

    def dropping(self, name: str) -> bool:
        """Whether adapter `name` drops out inputs right now (p > 0 and training mode)."""
        return name in self.dropout and self.dropout[name].training

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        if self.routing is not None:
            return self.routing.apply(self, x, self.base(x))
        names = self.running()
        if not names:
            return self.base(x)
        if fusable(self.base) and not torch.compiler.is_compiling():  # compiled: plain ops, which inductor fuses
            if all(self.plain(n) for n in names):
                return self._fused(x, names)
            if len(names) == 1 and names[0] in self.lora_magnitude and self.active[names[0]] == 1.0 \
                    and not self.dropping(names[0]):
                return self._fused_dora(x, names[0])
        result = self.base(x)  # (..., out)
        for name in names:
            result = self.add_update(x, result, name, self.active[name])
        return result

    def running(self) -> list[str]:
        """The adapters the forward applies: active, held by this layer, not merged into the base."""
        return [n for n in self.active if n in self.lora_A and n not in self.merged]

    def fusable(self) -> bool:
        """Whether the forward may take the fused LoRA path: `lorakit.fused.fusable` of the base, and every
        running adapter plain LoRA."""
        return fusable(self.base) and all(self.plain(n) for n in self.running())

    def _fused(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """base(x) + Σ w·s·B(A(dropout(x))) through `FusedLoraLinear`, which saves and computes only what LoRA needs."""
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, self.in_features).to(dtype)  # (N, in)
        y = FusedLoraLinear.apply(x2, *self.fused_args(names, dtype))
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def _fused_dora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """base(x) mapped by one DoRA adapter through `dora.FusedDoraLinear`."""
        dtype = compute_dtype(x)
        autocast = torch.is_autocast_enabled(self._base_dtype_device()[1].type)
        y = dora.fused(self, x.reshape(-1, self.in_features).to(dtype), name, dtype, autocast)  # (N, out)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    def fused_args(self, names: list[str], dtype: torch.dtype) -> tuple:
        """`FusedLoraLinear`'s arguments after x (N, in) in `dtype`: weight, bias, then per adapter the scale,
        the dropout probability and the down projection's dtype (tuples), then (Aᵢ, Bᵢ) per adapter."""
        base = self.base
        W = self.base_weight(dtype)  # (out, in); NF4 is dequantized into `dtype` chunk by chunk where it is used
        autocast = torch.is_autocast_enabled(self._base_dtype_device()[1].type)
        bias = base.bias
        scales, drops, downs, weights = [], [], [], []
        for name in names:
            A, B = self.lora_A[name], self.lora_B[name]  # (r, in), (out, r)
            # The down projection runs in the adapter's precision (fp32 masters) unless autocast says
            # otherwise, as the unfused path did; the up projection in the base output's precision.
            down = dtype if autocast else A.dtype
            scales.append(self.scaling[name] * self.active[name])
            drops.append(self.dropout[name].p if self.dropping(name) else 0.0)
            downs.append(down)
            weights += [A.to(down), B.to(dtype)]
        return (W, None if bias is None else bias.to(dtype), tuple(scales), tuple(drops), tuple(downs), *weights)

    def project_down(self, x: torch.Tensor, name: str, weight: float) -> torch.Tensor:
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

    def add_update(self, x: torch.Tensor, result: torch.Tensor, name: str, weight: float) -> torch.Tensor:
        """`result` with adapter `name` at `weight` applied, by plain autograd ops: the general path (Embedding, a
        trainable or hooked base, DoRA with others), and per-row routing's for DoRA and lora_bias adapters."""
        if name in self.lora_magnitude:
            return dora.add(self, x, result, name, weight)
        A = self.lora_A[name]
        if not torch.is_grad_enabled() and result.dtype != A.dtype and self.kind == "linear" \
                and name not in self.lora_bias and not self.dropping(name) and x.numel() <= FEW_ROWS * A.shape[1]:
            # Inference on a low-precision base with full-precision adapters, a few rows (a decode step):
            # the rank-r products in the adapter's precision, autocast off (on a CPU a bf16 product costs
            # ~20 us however small: at one row that made each update several times the fp32 one's cost),
            # the update rounded into `result` once. Many rows (a prefill) stay in bf16, faster there.
            # In place only into a fresh output of a known base: a hook or a subclass may hold on to it.
            fresh = type(self.base) in FRESH_OUTPUT and not self.base._forward_hooks
            with torch.autocast(x.device.type, enabled=False):
                h = F.linear(x.to(A.dtype), A).mul_(self.scaling[name] * weight)  # (..., r)
                return (result if fresh else result.clone()).add_(F.linear(h, self.lora_B[name]))  # (..., out)
        h = self.project_down(x, name, weight).to(result.dtype)  # (..., r)
        B = self.lora_B[name].to(result.dtype)  # (out, r)
        if name in self.lora_bias:
            result = result + self.lora_bias[name].to(result.dtype) * (self.scaling[name] * weight)  # (..., out)
        if self.kind == "embedding":
            return result + h @ B.t()  # (..., out)
        # One addmm gives the sum without a separate (..., out) product. Not in place: under autograd an
        # in-place add into a view of the output makes its backward copy the whole gradient.
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), B.t())  # (N, out)
        return out.view_as(result)

    def dense_weight(self) -> torch.Tensor | None:
        """base.weight + Σ w·s·B·A, (out, in), as one tensor under autograd, for a caller that forms the
        whole matrix anyway (the fused loss multiplies the output head's weight chunk by chunk); None where
        this layer's forward is not x·that (dropout drawing, DoRA or lora_bias, per-row routing, a base other than
        plain Linear)."""
        if type(self.base) is not nn.Linear or self.routing is not None:
            return None
        W = self.base.weight  # (out, in)
        names = [] if self.disabled else self.running()
        if not names:
            return W
        if any(self.dropping(n) or not self.plain(n) for n in names):  # DoRA's f, a lora_bias: not one W
            return None
        delta = sum(self.lora_B[n] @ self.lora_A[n] * (self.scaling[n] * self.active[n]) for n in names)  # (out, in)
        return W + delta.to(W.dtype)

    # -- merge --------------------------------------------------------------------------------

    def delta_weight(self, name: str, weight: float = 1.0) -> torch.Tensor:
        """w·s·B·A in fp32, laid out like base.weight ((out, in); (in, out) for Conv1D and Embedding)."""
        delta = self._delta(name, weight)
        return delta if self.kind == "linear" else delta.t()

    def _delta(self, name: str, weight: float = 1.0) -> torch.Tensor:
        """w·s·B·A in fp32, (out, in): a new tensor, scaled in place (the same bits as `(B @ A) * s * w`, with
        no full-size temporaries: a streamed merge of a 7B base makes one per adapted weight)."""
        delta = (self.lora_B[name].float() @ self.lora_A[name].float()).mul_(self.scaling[name])
        return delta if weight == 1 else delta.mul_(weight)  # x·1 is x exactly

    @torch.no_grad()
    def folded_weight(self, adapters: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(W with `adapters` (default: the active, unmerged ones) folded in, in order, fp32 and laid out
        like base.weight; each DoRA adapter's f). The base weight must be unmerged: DoRA's n reads it."""
        adapters = {n: w for n, w in self.active.items() if n in self.lora_A and n not in self.merged} \
            if adapters is None else adapters
        W = self._dense_weight()  # (out, in) fp32
        if W.is_meta:  # a streamed merge's skeleton (lorakit.export): the real weights are folded as they stream
            return (W if self.kind == "linear" else W.t()), {}
        scales = {n: dora.scale(self, n).float() for n in adapters if n in self.lora_magnitude}  # from the unmerged W
        for name, weight in adapters.items():
            if name in scales:
                keep = 1 + weight * (scales[name] - 1)
                if not bool((keep != 0).all()):  # unmerge divides by it
                    raise UserError(f"DoRA adapter {name!r} at weight {weight:g} zeroes an output feature of "
                                    "the base weight, which could not be unmerged; merge it at another weight")
                W = dora.merged_weight(W, self._delta(name), scales[name], weight)
            else:
                W += self._delta(name, weight)
        return (W if self.kind == "linear" else W.t()), scales

    def check_mergeable(self) -> None:
        """Raise UserError if `merge()` would refuse this layer (checked for every layer before any merges)."""
        if getattr(self.base, "bias", None) is None and any(n in self.lora_bias for n in self.running()):
            raise UserError("an adapter with lora_bias cannot be merged into a layer without a bias (as in PEFT); "
                            "use it unmerged")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every active, not yet merged adapter into base.weight (and a lora_bias into base.bias)."""
        todo = {n: w for n, w in self.active.items() if n in self.lora_A and n not in self.merged}
        if not todo:
            return
        if self.merged and any(n in self.lora_magnitude for n in todo):  # DoRA's n needs the unmerged W
            todo = {**self.merged, **todo}
            self.unmerge()
        self.check_mergeable()
        W, scales = self.folded_weight(todo)
        self._set_base(W)
        for name, weight in todo.items():
            if name in self.lora_bias:
                self._shift_bias(self.lora_bias[name] * (self.scaling[name] * weight))
            self.merged[name] = weight
        self.merged_scales.update(scales)

    def untie(self) -> None:
        """Give base.weight a copy of its own, so that a merge changes this layer only and not the module
        that shares the weight (an output head tied to the input embedding); `unmerge` ties it back."""
        if self.untied_from:
            return
        self.untied_from.append(self.base.weight)
        self.base.weight = nn.Parameter(self.base.weight.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.untied_from:  # the shared weight was never written: take it back, exactly
            self.base.weight = self.untied_from.pop()
            self.merged_scales.clear()
            W = None
        else:
            W = self._dense_weight()  # (out, in) fp32
        for name, weight in reversed(list(self.merged.items())):
            if W is not None and name in self.merged_scales:
                W = dora.unmerged_weight(W, self._delta(name), self.merged_scales.pop(name), weight)
            elif W is not None:
                W -= self._delta(name, weight)
            if name in self.lora_bias:
                self._shift_bias(-self.lora_bias[name] * (self.scaling[name] * weight))
        if W is not None:
            self._set_base(W if self.kind == "linear" else W.t())
        self.merged.clear()

    def _dense_weight(self) -> torch.Tensor:
        """The base weight in fp32, (out, in); a copy (an NF4 base's dequantized)."""
        W = self.base_weight()
        return W.dequantize(torch.float32) if isinstance(W, NF4Tensor) else W.float().clone()

    def _set_base(self, W: torch.Tensor) -> None:
        """base.weight <- W (fp32, in base.weight's layout), rounded once to the base's dtype."""
        if isinstance(self.base, NF4Linear):  # dequantize, add, re-quantize: lossy, so unmerge is only close
            self.base.add_to_weight(W - self.base.weight.float())
            return
        if isinstance(self.base, PackedLinear):  # packed again, from W rounded once to its dtype
            self.base.set_weight(W)
            return
        self.base.weight.copy_(W.to(self.base.weight.device))

    def _shift_bias(self, delta: torch.Tensor) -> None:
        bias = self.base.bias
        bias.copy_((bias.float() + delta.float().to(bias.device)).to(bias.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank(n)}" for n in self.lora_A)
        return f"kind={self.kind}, adapters=[{ranks}], active={list(self.active)}, merged={list(self.merged)}"


def _slot(name: str) -> str:
    """The attribute an adapter named `name` is stored under. torch refuses '.' in parameter and module names
    (they are path separators in state_dict keys), while adapter names come from folder names such as
    'llama-3.1-lora': so '.' is escaped, reversibly ('%' first, so every name has its own slot)."""
    if "%" not in name and "." not in name:  # most names: no copy (this runs per layer per forward when routing)
        return name
    return name.replace("%", "%25").replace(".", "%2E")


def _unslot(slot: str) -> str:
    return slot if "%" not in slot else slot.replace("%2E", ".").replace("%25", "%")


class AdapterParameters(nn.ParameterDict):
    """A ParameterDict keyed by adapter name, any name: `_key_to_attr` is torch's hook for the stored name."""

    def _key_to_attr(self, key: str) -> str:
        return _slot(super()._key_to_attr(key))

    def by_name(self) -> dict[str, nn.Parameter]:
        """name -> parameter as a plain dict (the fast path for a loop over every adapter)."""
        return {_unslot(k): p for k, p in self._parameters.items()}


class AdapterModules(nn.ModuleDict):
    """A ModuleDict keyed by adapter name, any name (stored under `_slot(name)`, as `AdapterParameters`)."""

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[_slot(name)]

    def __setitem__(self, name: str, module: nn.Module) -> None:
        self.add_module(_slot(name), module)

    def __delitem__(self, name: str) -> None:
        del self._modules[_slot(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _slot(name) in self._modules

    def __iter__(self):
        return (_unslot(k) for k in self._modules)

    def keys(self):
        return list(self)

    def items(self):
        return [(_unslot(k), m) for k, m in self._modules.items()]

    def pop(self, name: str) -> nn.Module:
        return self._modules.pop(_slot(name))


class SavedModule(nn.Module):
    """`modules_to_save`: a trainable full copy of a module per adapter; the original stays frozen."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.copies = AdapterModules()
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
        elif init == "orthogonal":  # PEFT's: B·A ≠ 0 at the start, rows/columns from one orthogonal matrix
            variant_init.orthogonal(A, B)
        else:  # B zero makes the injected model equal the base; A random so B gets gradients
            if init == "gaussian":
                nn.init.normal_(A, std=1 / r)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
