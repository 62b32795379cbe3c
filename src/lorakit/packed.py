"""Inference on CPUs where oneDNN beats torch's default product: frozen Linear weights it holds pre-packed.

bf16, on CPUs with AMX / AVX-512-BF16. Where bf16 runs on such a CPU (`--dtype bf16`, or `auto` for a model
big enough to decode faster in bf16: `lorakit.base.resolve_decode_dtype`), a bf16 product runs in oneDNN's
AMX kernel, which reads its weight in a blocked (VNNI) layout. An `nn.Linear` weight is plain (out, in), so
every call first repacks the whole weight: on a Sapphire Rapids guest with torch 2.13 that made a decode
step's products (1 row) *slower* than fp32 (the Qwen2-0.5B layer shapes: 828 us in bf16 against 727 us in
fp32; the embedded base's generate: 88 against 143 tokens/s), while many rows (training, prefill) were
2-5x faster. Packing each frozen weight once, when `generate`, `eval` or `serve` has loaded its model, takes
that cost out of every call (the same 0.5B shapes: 515 us at 1 row, 483 us at 4; bit-identical results,
same bytes).

A bf16 weight small enough that oneDNN's fixed cost per call (~20 us here) outweighs its arithmetic (the
embedded base's 256-wide layers, a 0.5B model's 128x896 key and value projections) is as fast or faster
in fp32 for one row. A weight of at most `SMALL_WEIGHT` elements therefore keeps an fp32 copy (at most
1 MB) and uses it for inputs of one row: a decode step of `generate`. Decided by size, not timed at
load: a timing per shape flipped between runs where the two were close (the embedded base's shapes at
one row on a Zen 5 host), and the same command must give the same text. Not where fp32 products go to
oneDNN (below): there the copy's product ran in the slow BLAS, and the embedded base's bf16 `generate`
ran at 240 tokens/s with the copies, 310 without (fp32: 315).

fp32, on CPUs where `lorakit.products` sends fp32 products to oneDNN (AMD with AVX-512 or AVX2, or
`LORAKIT_ONEDNN_FP32=1`; for `serve`, AMD with AVX-512 only: `products.choose`). There torch's BLAS (MKL) was
slow at a decode step's few rows too: on a Zen 5 guest, x·Wᵀ at 8 rows took 1527 us in MKL and 417 us with
a packed weight for 896 -> 4864, 560 against 129 for the embedded base's 8192 x 256 output head; a whole
decode step of the embedded base at 8 rows ran 1.4-1.7x faster with every weight packed (BENCHMARKS.md).
An fp32 weight is always packed (no fp32 copy: it was no faster at one row, measured in whole steps).

A packed weight is the only copy (`weight` unpacks a dense one on each read), except where another module
shares the weight (an output head tied to the input embedding): that Linear becomes a `PackedCopyLinear`,
which keeps the shared weight as its parameter and multiplies by a packed copy (vocab x d more memory),
packed again whenever the weight is replaced or written. Only fp32 heads are packed so; bf16 tied heads
stay as they are (not measured where bf16 is packed for speed).

`serve` packs like `generate` and `eval` (except fp32 on AVX2-only AMD CPUs, where it keeps plain weights for
its transposed MKL product), and runs its engine on the process's main thread: from any other
thread, each oneDNN product paid for waking OpenMP's sleeping workers (8-row products 2-5x slower, packed
weights slower than plain ones; `lorakit.serve.app`). A packed weight has no gradient path of its own, so
a forward that needs an input gradient takes the dense weight (`PackedLinear.weight`), and training never
packs. A packed model is for running: its `state_dict()` lacks the packed weights, and it cannot be
deep-copied. A Linear inside lorakit's trainable-token and saved-module wrappers stays as it is (they write
or copy it). `LORAKIT_PACKED_WEIGHTS=0` turns packing off (to compare; bf16 results are the same, fp32 ones
differ by rounding only).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import base, products
from lorakit.errors import UserError

ENV = "LORAKIT_PACKED_WEIGHTS"
SMALL_WEIGHT = 1 << 18  # elements: weights up to this size keep an fp32 copy for one-row products
FP32_ROWS = 1  # rows up to which such a weight's product runs in fp32


def check_settings() -> str:
    """LORAKIT_PACKED_WEIGHTS ("", "0" or "1"; returned) and LORAKIT_ONEDNN_FP32, checked: a bad value is
    refused in one line. The inference commands call it before they load a model."""
    setting = os.environ.get(ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise UserError(f"{ENV}={setting!r} is not 0 or 1; set it to 0 (no packed weights) or unset it")
    products.setting()
    return setting


def supported(device: torch.device, dtype: torch.dtype, serving: bool = False) -> bool:
    """Whether `pack_for_inference` packs here, unless LORAKIT_PACKED_WEIGHTS=0: bf16 on a CPU whose bf16
    products oneDNN runs on AMX / AVX-512-BF16 (the hardware check behind `auto`, not its override); fp32
    where fp32 products go to oneDNN (`lorakit.products.choose(serving)`: the CPU, or LORAKIT_ONEDNN_FP32)."""
    if check_settings() == "0" or device.type != "cpu":
        return False
    if dtype == torch.float32:
        return products.choose(serving)
    return dtype == torch.bfloat16 and base.cpu_flags_have_fast_bf16() and base.onednn_bf16()


class PackedLinear(nn.Module):
    """A frozen bf16 or fp32 Linear whose weight oneDNN holds in its blocked layout (an opaque tensor, same bytes).

    `weight` unpacks a dense copy on each read (for what needs the plain tensor: merging, DoRA's norms,
    an input gradient); the forward never does. `fp32` (optional) is an fp32 copy of a small weight, used
    for inputs of at most `fp32_rows` rows (`fp32_rows()`)."""

    def __init__(self, linear: nn.Linear, fp32_rows: int = 0):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = weight.dtype
        self.packed = base.onednn_pack(weight)
        self.fp32 = weight.float() if fp32_rows else None
        self.fp32_rows = fp32_rows
        self.version = 0  # how often `set_weight` changed the weight (what caches of it key on)
        self.register_parameter("bias", None if linear.bias is None else
                                nn.Parameter(linear.bias.detach(), requires_grad=False))
        self.train(linear.training)  # a LoRA layer wrapped around it later takes its mode (its dropout)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight: a new tensor on every read, not a parameter."""
        return self.packed.to_dense()

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """W <- weight (out, in), rounded once to this layer's dtype (a merge into it), packed again."""
        weight = weight.to(self.dtype)
        self.packed = base.onednn_pack(weight)
        if self.fp32 is not None:
            self.fp32 = weight.float()
        self.version += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # a gradient to x: the dense weight, by autograd ops
            bias = None if self.bias is None else self.bias.to(self.dtype)
            return F.linear(x.to(self.dtype), self.weight, bias)
        rows = x.numel() // self.in_features
        if self.fp32 is not None and rows <= self.fp32_rows:
            bias = None if self.bias is None else self.bias.float()
            with torch.autocast(x.device.type, enabled=False):  # fp32 is the point here, whatever autocast says
                return F.linear(x.float(), self.fp32, bias).to(self.dtype)  # bf16 out, as the packed product
        bias = None if self.bias is None else self.bias.to(self.dtype)
        return base.onednn_linear(x.to(self.dtype), self.packed, bias)

    def extra_repr(self) -> str:
        fp32 = f", fp32 up to {self.fp32_rows} rows" if self.fp32_rows else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{fp32}"


class PackedCopyLinear(nn.Linear):
    """An `nn.Linear` (frozen, fp32) whose weight another module shares, multiplied by a packed copy of it.

    The weight stays this module's parameter, the shared one, so whatever works on a tied `nn.Linear`
    works here (a merge unties it, an unmerge ties it back); the copy is packed again before a product
    whenever the weight is another tensor, has another storage, or was written in place (its version
    counter). A forward that needs a gradient, or on an inference tensor (no version counter), takes the
    plain product."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta",
                         dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.train(linear.training)
        self._packed: tuple[torch.Tensor, tuple, torch.Tensor] | None = None  # (weight, its state, packed copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) or weight.is_inference() \
                or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.device.type != "cpu" \
                or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return F.linear(x, weight, self.bias)  # (an inference tensor keeps no version counter)
        state = (weight.data_ptr(), weight._version)  # another storage (`.data = ...`) or written in place
        if self._packed is None or self._packed[0] is not weight or self._packed[1] != state:
            self._packed = None  # the old copy goes before the new one is made
            self._packed = (weight, state, base.onednn_pack(weight.detach()))
        return base.onednn_linear(x, self._packed[2], self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed copy"


def pack_for_inference(model: nn.Module, serving: bool = False) -> int:
    """Replace every frozen bf16 or fp32 `nn.Linear` of `model` (a LoRA layer's base included) by a
    `PackedLinear` (an fp32 one whose weight another module shares by a `PackedCopyLinear`), on hosts where
    `supported` (for `serve` if `serving`); returns how many. Call it once the model is loaded, for
    inference only."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is None or not supported(first.device, first.dtype, serving):
        return 0
    dtype = first.dtype
    del first
    shared: dict[int, int] = {}  # a weight held by several modules (a tied head): a packed copy in fp32
    for module in model.modules():
        for p in module.parameters(recurse=False):
            shared[id(p)] = shared.get(id(p), 0) + 1
    targets = []
    for name, module in model.named_modules():
        # Inside lorakit's own modules only the children they declare (a LoRA layer's base): the others
        # (trainable tokens, a saved module's copies) write their base's weight or copy the module.
        lorakit_module = type(module).__module__.startswith("lorakit.")
        for child_name, child in module.named_children():
            if lorakit_module and child_name not in getattr(module, "packable_children", ()):
                continue
            if type(child) is nn.Linear and child.weight.dtype == dtype \
                    and child.weight.device.type == "cpu" \
                    and (shared[id(child.weight)] == 1 or child.weight.dtype == torch.float32) \
                    and not child._forward_hooks and not child._forward_pre_hooks:
                targets.append((module, child_name, child))
    count = len(targets)
    while targets:  # each original Linear (its dense weight) goes as soon as its packed one is in place
        parent, child_name, child = targets.pop()
        packed = PackedLinear(child, fp32_rows(child.weight, serving)) if shared[id(child.weight)] == 1 \
            else PackedCopyLinear(child)
        setattr(parent, child_name, packed)
        del parent, child, packed
    return count


def fp32_rows(weight: torch.Tensor, serving: bool = False) -> int:
    """Up to how many rows a product with `weight` takes the fp32 copy: `FP32_ROWS` for a bf16 weight of at
    most `SMALL_WEIGHT` elements where fp32 products run through torch's BLAS, else 0: always packed (an
    fp32 weight, a bigger one, or where that BLAS is the slow one, `lorakit.products.choose(serving)`)."""
    if weight.dtype == torch.float32 or weight.numel() > SMALL_WEIGHT or products.choose(serving):
        return 0
    return FP32_ROWS
