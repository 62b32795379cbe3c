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

try:  # transformers' GPT-2 style linear with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    Conv1D = ()


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' or 'embedding' for a base LoRA can wrap, else None."""
    if isinstance(module, nn.Linear):
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
        self.dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: dict[str, float] = {}  # adapters in use -> user weight
        self.merged: dict[str, float] = {}  # adapters folded into base.weight -> weight used
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # per-row routing for a mixed batch

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: bool | str) -> None:
        weight = self.base.weight
        # Adapter weights are fp32 masters even on a bf16/fp16 base: small, and precise to update.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        A = torch.empty(r, self.in_features, dtype=dtype, device=weight.device)
        B = torch.empty(self.out_features, r, dtype=dtype, device=weight.device)
        _init_lora(A, B, init, embedding=self.kind == "embedding", r=r)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.scaling[name] = scaling
        # p = 0 needs no dropout module at all: Identity makes no copy of x.
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout[name].train(self.training)  # a new module defaults to training mode; follow the model

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base; unmerge before deleting it")
        for table in (self.lora_A, self.lora_B, self.dropout):
            del table[name]
        self.scaling.pop(name)
        self.active.pop(name, None)

    def rank(self, name: str) -> int:
        return self.lora_A[name].shape[0]

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            return self._add_per_row(x, result)
        for name, weight in self.active.items():
            if name in self.lora_A and name not in self.merged:
                result = self._add_update(x, result, name, weight)
        return result

    def _down(self, x: torch.Tensor, name: str, weight: float) -> torch.Tensor:
        """The scaled rank-r projection s·w·A(dropout(x)), shape (..., r)."""
        A = self.lora_A[name]
        if self.kind == "embedding":
            h = F.embedding(x, A.t(), padding_idx=self.base.padding_idx, max_norm=self.base.max_norm,
                            norm_type=self.base.norm_type, scale_grad_by_freq=self.base.scale_grad_by_freq,
                            sparse=self.base.sparse)  # (..., r)
        else:
            h = F.linear(self.dropout[name](x).to(A.dtype), A)  # (..., r)
        # Scale the rank-r tensor, not the (..., out) one: r/out of the work and no full-size temporary.
        return h * (self.scaling[name] * weight)

    def _add_update(self, x: torch.Tensor, result: torch.Tensor, name: str, weight: float) -> torch.Tensor:
        h = self._down(x, name, weight).to(result.dtype)  # (..., r)
        B = self.lora_B[name].to(result.dtype)  # (out, r)
        if result.is_contiguous() and self.kind != "embedding":
            # In place into the base output: the base's backward needs its input, never its output,
            # so autograd allows it, and no (..., out) temporary is formed.
            result.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), B.t())  # (N, out)
            return result
        return result + h @ B.t()  # (..., out)

    def _add_per_row(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Row i of the batch gets adapter row_adapters[i] at weight 1 (None: base only)."""
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(f"per-row adapters name {len(self.row_adapters)} rows but the batch has {x.shape[0]}")
        for name in dict.fromkeys(n for n in self.row_adapters if n is not None and n in self.lora_A):
            rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
            h = self._down(x.index_select(0, rows), name, 1.0).to(result.dtype)  # (n, ..., r)
            delta = h @ self.lora_B[name].to(result.dtype).t()  # (n, ..., out)
            result = result.index_add(0, rows, delta)
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
        W = self.base.weight
        # Accumulate in fp32 so a bf16 base loses no more than one rounding.
        W.copy_((W.float() + delta.to(W.device)).to(W.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank(n)}" for n in self.lora_A)
        return f"kind={self.kind}, adapters=[{ranks}], active={list(self.active)}, merged={list(self.merged)}"


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
