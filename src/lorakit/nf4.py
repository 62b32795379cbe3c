"""NF4, QLoRA's 4-bit NormalFloat base weights (Dettmers et al. 2023), byte for byte as bitsandbytes.

    q = nf4.quantize(weight)          # NF4Tensor: 4-bit codes + one absmax per block of 64 values
    w = q.dequantize()                # the weight again, each value one of 16 levels × its block's absmax
    nf4.quantize(model)               # every Linear but the output head -> NF4Linear, a frozen 4-bit base

The format is bitsandbytes' `quantize_4bit(quant_type="nf4")`, so both hold the same bytes:
- the tensor is flattened and cut into blocks of `blocksize` values (the last block may be short); a
  block is divided by its absmax and each value rounded to the nearest of the 16 NF4 levels (ties
  to the lower one);
- `packed` holds two codes a byte, the first element in the high nibble;
- double quantization stores the absmax values in 8 bits too: minus their mean, in blocks of 256,
  with bitsandbytes' signed dynamic 8-bit code. The constants then cost 8/64 + 32/(64·256) bits per
  weight instead of 32/64: 4.127 bits in all.

`NF4Linear` is the base a `LoraLayer` wraps for QLoRA. Its forward dequantizes the weight in row
chunks on the fly and its backward dequantizes again for the input gradient: no full-precision copy
of the weight outlives a call. A saved NF4 model is a transformers directory in bitsandbytes'
serialization (`save_quantized` / `load_quantized`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import UserError
from lorakit.modules import matches, output_head, set_module

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (QLoRA, appendix E).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])  # (16,) fp32
_NF4_BOUNDS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2  # (15,) midpoints: a value rounds to the nearer level
# Byte -> its two levels (high nibble first) as one 8-byte word: one 1-D gather decodes two weights,
# about twice as fast on CPU as gathering rows of a (256, 2) table.
_NF4_PAIRS = torch.stack((NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)), 1).view(torch.int64).view(-1)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
ABSMAX_BLOCKSIZE = 256  # block of the double-quantized absmax values
_CHUNK = 1 << 22  # weight elements dequantized at a time in forward/backward (16 MB in fp32)
_QUANT_CHUNK = 1 << 20  # weight elements quantized at a time
QUANT_STATE = "quant_state.bitsandbytes__nf4"  # bitsandbytes' key for a weight's JSON metadata


@functools.cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map()`), built the same way: (256,) fp32.

    Level i has a decimal exponent from -6 to 0 and 2^i linearly spaced fractions in (0.1, 1) of each sign.
    """
    values = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (-6 + i) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(values + [0, 1.0]), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU rounding for the 8-bit code: [-1, 1] cut into 65536 steps, each mapped to its nearest code."""
    code = dynamic_code()
    bounds = 0.5 * (code[:-1] + code[1:])
    steps = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    return torch.searchsorted(bounds, steps).to(torch.uint8)  # (65536,): codes below each step


# -- the tensor format --------------------------------------------------------------------------------


@dataclass
class NF4Tensor:
    """A tensor in NF4: `packed` codes plus per-block absmax constants (8-bit ones with double quant)."""

    packed: torch.Tensor
    """(ceil(n / 2),) uint8: two 4-bit codes a byte, the first element in the high nibble."""
    absmax: torch.Tensor
    """(blocks,) fp32 per-block scale; with double quant, uint8 codes of (absmax - offset)."""
    shape: torch.Size
    dtype: torch.dtype
    """The original dtype, which `dequantize()` returns by default."""
    blocksize: int = 64
    absmax_scale: torch.Tensor | None = None
    """Double quant: (ceil(blocks / 256),) fp32 absmax of each block of 256 absmax values."""
    absmax_offset: torch.Tensor | None = None
    """Double quant: () fp32 mean of the absmax values, subtracted before quantizing them."""

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of codes and constants together."""
        parts = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel()

    def with_dtype(self, dtype: torch.dtype) -> NF4Tensor:
        """The same codes with another dtype to dequantize into (the compute dtype of its layer)."""
        return dataclasses.replace(self, dtype=dtype)

    def block_absmax(self) -> torch.Tensor:
        """(blocks,) fp32 scales, undoing double quant as bitsandbytes does (code × scale, then + offset)."""
        if not self.double_quant:
            return self.absmax.float()
        code = dynamic_code().to(self.absmax.device)
        return _scale_blocks(code[self.absmax.long()], self.absmax_scale, ABSMAX_BLOCKSIZE) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full tensor in `dtype` (default: the original dtype)."""
        return self._flat(0, self.numel(), self.block_absmax()).to(dtype or self.dtype).view(self.shape)

    def rows(self, start: int, stop: int, dtype: torch.dtype, absmax: torch.Tensor | None = None,
             scratch: bool = False) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, (stop - start, columns) in `dtype`; pass `absmax` to reuse it.

        With `scratch` the result lives in this thread's decode buffers: valid only until the next
        scratch decode, for a caller that uses it at once (a matmul) and keeps nothing of it.
        """
        cols = self.shape[1]
        absmax = self.block_absmax() if absmax is None else absmax
        values = self._flat(start * cols, stop * cols, absmax, scratch)
        if scratch and dtype != values.dtype:
            values = _scratch("cast", values.numel(), dtype, values.device).copy_(values)
        return values.to(dtype).view(stop - start, cols)

    def _flat(self, start: int, stop: int, absmax: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, fp32: whole blocks are decoded, then trimmed."""
        bs = self.blocksize
        first, last = start // bs, -(-stop // bs)  # the blocks that hold the range
        lo, hi = first * bs, min(last * bs, self.numel())  # lo is even: blocks start on a byte
        packed = self.packed[lo // 2:(hi + 1) // 2]  # (bytes,)
        pairs = _NF4_PAIRS.to(self.packed.device)
        if scratch:  # into reused buffers: no allocation per chunk, so no heap left fragmented behind
            codes = _scratch("codes", packed.numel(), torch.int32, packed.device).copy_(packed)
            out = _scratch("pairs", packed.numel(), pairs.dtype, packed.device)
            values = torch.index_select(pairs, 0, codes, out=out).view(torch.float32)  # (2·bytes,) levels
        else:
            values = pairs.index_select(0, packed.int()).view(torch.float32)  # (2·bytes,) levels
        if values.numel() < (last - first) * bs:  # a short last block: pad with zeros
            values = F.pad(values, (0, (last - first) * bs - values.numel()))
        values = values.view(-1, bs).mul_(absmax[first:last, None]).view(-1)  # (blocks·bs,) level × absmax
        return values[start - lo:stop - lo]


_SCRATCH = threading.local()  # per thread: {(name, dtype, device): 1-D buffer}


def _scratch(name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable 1-D buffer `name` of at least `n` elements; its first `n`.

    The matmul paths decode every weight chunk into the same few buffers instead of fresh tensors. A
    QLoRA step on a 7B base otherwise allocates and frees thousands of 8-16 MB decode tensors between
    the activations it keeps, and glibc's heap stays grown behind them.
    """
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < n:
        with torch.inference_mode(False):  # a normal tensor, also when first made under inference mode
            buffers[key] = buffer = torch.empty(n, dtype=dtype, device=device)
    return buffer[:n]


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values × the scale of each one's block (the last block may be short)."""
    n = values.numel()
    padded = F.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    return (padded * scales[:, None]).view(-1)[:n]


def _quantize_tensor(weight: torch.Tensor, blocksize: int, double_quant: bool) -> NF4Tensor:
    if not weight.is_floating_point() or weight.numel() == 0:
        raise UserError(f"NF4 quantizes non-empty floating-point tensors, got {weight.dtype} "
                        f"of shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    # A chunk of whole blocks at a time: the fp32 working copies stay a few MB, whatever the weight's size.
    step = max(1, _QUANT_CHUNK // blocksize) * blocksize  # even: every chunk but the last packs exactly
    for start in range(0, n, step):
        stop = min(start + step, n)
        absmax[start // blocksize:-(-stop // blocksize)], codes = _nf4_codes(flat[start:stop].float(), blocksize)
        codes = F.pad(codes, (0, codes.numel() % 2), value=7)  # an odd count ends with the code of 0.0
        packed[start // 2:(stop + 1) // 2] = (codes[0::2] << 4) | codes[1::2]  # first element in the high nibble
    q = NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize)
    if double_quant:
        q.absmax_offset = absmax.mean()
        q.absmax, q.absmax_scale = _quantize_8bit(absmax - q.absmax_offset, ABSMAX_BLOCKSIZE)
    return q


def _nf4_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax (blocks,) fp32, codes (n,) uint8) of fp32 values that start on a block boundary."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (blocks, bs)
    absmax = blocks.abs().amax(1)  # (blocks,)
    # Multiply by 1/absmax, and divide in the short last block: the exact steps bitsandbytes takes.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).view(-1)
    if full < n:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last[None]])
        scaled = torch.cat([scaled, (flat[full:] / last).clamp(-1, 1)])
    codes = torch.bucketize(scaled, _NF4_BOUNDS.to(flat.device), out_int32=True).to(torch.uint8)  # (n,) ties go down
    return absmax, codes


def _quantize_8bit(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit dynamic quantization, rounding as bitsandbytes' CPU kernel: (uint8 codes, fp32 absmax)."""
    n = values.numel()
    blocks = F.pad(values, (0, -n % blocksize)).view(-1, blocksize)  # zero padding leaves each absmax alone
    absmax = blocks.abs().amax(1)  # (blocks,)
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)
    scaled = (blocks * inv[:, None]).clamp(-1, 1)
    steps = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).int()  # fp32 steps, truncated, in the kernel's order
    codes = _dynamic_lut().to(values.device)[steps.long()]
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


def _check(kind: str, blocksize: int) -> None:
    if kind != "nf4":
        raise UserError(f"unknown quantization {kind!r}; lorakit supports 'nf4'")
    if blocksize not in BLOCKSIZES:
        raise UserError(f"NF4 blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")


# -- the frozen base layer ----------------------------------------------------------------------------


class NF4Linear(nn.Module):
    """A frozen Linear stored in NF4. `weight` dequantizes on each read; only the bias is a parameter."""

    def __init__(self, q: NF4Tensor, bias: nn.Parameter | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.blocksize = q.blocksize
        self.dtype = q.dtype  # of `weight` and of the matmul when the input does not say otherwise
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_offset", q.absmax_offset)
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return cls(_quantize_tensor(linear.weight, blocksize, double_quant), bias)

    @property
    def quantized(self) -> NF4Tensor:
        """The weight as an NF4Tensor over this module's buffers (no copy)."""
        return NF4Tensor(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)), self.dtype,
                         self.blocksize, self.absmax_scale, self.absmax_offset)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight: a new tensor on every read, not a parameter."""
        return self.quantized.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        # Under autocast compute in its dtype, as nn.Linear would; the weight is dequantized straight into it.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _NF4Matmul.apply(x.to(dtype), bias, self.quantized)

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """W <- NF4(W + delta): dequantize, add in fp32, quantize again in the same format (lossy)."""
        q = _quantize_tensor(self.weight.float() + delta.to(self.packed.device), self.blocksize,
                             self.absmax_scale is not None)
        for name in ("packed", "absmax", "absmax_scale", "absmax_offset"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(q, name))

    def storage_as_parameters(self) -> None:
        """Hold the codes and constants as frozen parameters instead of buffers, for FSDP, which shards
        parameters only (buffers stay whole on every rank). The scalar offset becomes shape (1,): FSDP
        splits along a first dimension and refuses 0-d parameters. Same values, same forward."""
        for name in ("packed", "absmax", "absmax_scale", "absmax_offset"):
            t = self._buffers.pop(name)
            if t is not None:
                t = t.reshape(1) if t.dim() == 0 else t
            self.register_parameter(name, None if t is None else nn.Parameter(t, requires_grad=False))

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the fp32 constants (they are part of the format): move them as
        # raw bits, and take the new dtype as the compute dtype instead.
        floats = [k for k, b in self._buffers.items() if b is not None and b.dtype == torch.float32]
        for k in floats:
            self._buffers[k] = self._buffers[k].view(torch.int32)
        try:
            super()._apply(fn, recurse)
        finally:
            for k in floats:
                self._buffers[k] = self._buffers[k].view(torch.float32)
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.packed.device)).dtype
        return self

    def extra_repr(self) -> str:
        double = ", double_quant" if self.absmax_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}{double}, dtype={self.dtype}")


class _NF4Matmul(torch.autograd.Function):
    """y = x·Wᵀ + b for an NF4 weight W, dequantized chunk by chunk in forward and again in backward.

    Nothing of W's size is saved for backward: the NF4 codes are the only copy of the weight.
    """

    @staticmethod
    def forward(ctx, x, bias, q):
        ctx.q = q
        y = nf4_linear(x.reshape(-1, q.shape[1]), q, bias)  # (N, out)
        return y.view(*x.shape[:-1], q.shape[0])  # (..., out)

    @staticmethod
    def backward(ctx, g):  # g: (..., out)
        q = ctx.q
        g2 = g.reshape(-1, q.shape[0])  # (N, out)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_grad_input(g2, q).view(*g.shape[:-1], q.shape[1])
        if ctx.needs_input_grad[1]:
            grad_bias = g2.sum(0)  # (out,)
        return grad_x, grad_bias, None


def nf4_linear(x2: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 (N, in) · Wᵀ + b (N, out), W dequantized into x2's dtype a chunk of rows at a time."""
    absmax = q.block_absmax()
    chunks = _row_chunks(q)
    if len(chunks) == 1:
        return F.linear(x2, q.rows(0, q.shape[0], x2.dtype, absmax, scratch=True), bias)  # (N, out)
    y = x2.new_empty(x2.shape[0], q.shape[0])  # (N, out)
    for start, stop in chunks:
        y[:, start:stop] = x2 @ q.rows(start, stop, x2.dtype, absmax, scratch=True).t()  # (N, rows)
    if bias is not None:
        y += bias
    return y


def nf4_grad_input(g2: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """g2 (N, out) · W (N, in): the input gradient of `nf4_linear`, W dequantized again chunk by chunk."""
    absmax = q.block_absmax()
    grad_x = None
    for start, stop in _row_chunks(q):
        g_part, W_part = g2[:, start:stop], q.rows(start, stop, g2.dtype, absmax, scratch=True)  # (N, rows), (rows, in)
        grad_x = g_part @ W_part if grad_x is None else grad_x.addmm_(g_part, W_part)  # (N, in)
    return grad_x


def _row_chunks(q: NF4Tensor) -> list[tuple[int, int]]:
    rows = max(1, _CHUNK // q.shape[1])
    return [(start, min(start + rows, q.shape[0])) for start in range(0, q.shape[0], rows)]


# -- models -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeSpec:
    """Which Linear layers of a model go to NF4, and how (what `quantize(model, ...)` takes)."""

    kind: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    include: list[str] | str | None = None
    """None: every Linear but the output head; names (exact or '.'-suffix) or a regex over full names."""

    def __post_init__(self) -> None:
        _check(self.kind, self.blocksize)


def quantize(target, kind: str = "nf4", *, blocksize: int = 64, double_quant: bool = True,
             include: list[str] | str | None = None):
    """NF4-quantize a tensor (returns an NF4Tensor) or a model's Linear layers in place (returns the model).

    For a model, `include` picks the Linear layers: None is every one but the output head; a list names
    modules (exactly or as a '.'-suffix) and a string is a regex over full names, as in target_modules.
    Quantize the base before adding adapters.
    """
    _check(kind, blocksize)
    if not isinstance(target, nn.Module):
        return _quantize_tensor(target, blocksize, double_quant)
    if getattr(target, "lorakit_configs", None):
        raise UserError("the model already has adapters; quantize the base first, then inject or load them")
    for name in quantize_targets(target, include):
        set_module(target, name, NF4Linear.from_linear(target.get_submodule(name), blocksize, double_quant))
    return target


def quantize_targets(model: nn.Module, include: list[str] | str | None = None) -> list[str]:
    """The names of the Linear layers `quantize(model, include=include)` turns into NF4 (works on a
    skeleton on the meta device too)."""
    head = output_head(model)
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if include is None:
        chosen = [n for n, m in linear if m is not head]
    else:
        chosen = [n for n, _ in linear if matches(include, n)]
        other = [(n, m) for n, m in model.named_modules()
                 if n and matches(include, n) and not isinstance(m, nn.Linear)]
        if other and not chosen:
            raise UserError(f"include={include!r} names {other[0][0]!r}, a {type(other[0][1]).__name__}; "
                            "NF4 quantizes Linear layers only")
    if not chosen:  # without include= no choice would help: the fix is not to quantize at all
        fix = "run it in full precision" if include is None else "check include="
        raise UserError(f"no Linear layers to quantize in this model (GPT-2's Conv1D layers are not supported); {fix}")
    return chosen


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every NF4Linear (also inside LoRA layers) with a plain nn.Linear of its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device="meta")
            linear.weight = nn.Parameter(module.weight, requires_grad=False)
            if module.bias is not None:
                linear.bias = module.bias
            set_module(model, name, linear)
    return model


@dataclass(frozen=True)
class BaseMemory:
    """What a model's weights take: NF4 weights count their elements as parameters and their codes as bytes."""

    params: int
    bytes: int
    nf4_params: int
    nf4_bytes: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0

    @property
    def nf4_bits_per_param(self) -> float | None:
        """Bits per NF4 weight including its constants (4.127 with double quant at block 64)."""
        return 8 * self.nf4_bytes / self.nf4_params if self.nf4_params else None


def base_memory(model: nn.Module) -> BaseMemory:
    """Parameters and bytes of every weight in `model` (call it on the base, before adding adapters)."""
    params = {id(p): p for p in model.parameters()}.values()
    nf4 = [m.quantized for m in model.modules() if isinstance(m, NF4Linear)]
    nf4_params, nf4_bytes = sum(q.numel() for q in nf4), sum(q.nbytes for q in nf4)
    return BaseMemory(params=sum(p.numel() for p in params) + nf4_params,
                      bytes=sum(p.numel() * p.element_size() for p in params) + nf4_bytes,
                      nf4_params=nf4_params, nf4_bytes=nf4_bytes)


# -- NF4 model directories ----------------------------------------------------------------------------


def save_quantized(model: nn.Module, directory: str | Path) -> None:
    """Write `model` (with NF4Linear layers) as a transformers directory in bitsandbytes' 4-bit serialization.

    config.json gets a bitsandbytes `quantization_config`; each NF4 weight is stored under `<module>.weight`
    (packed codes) with `.absmax`, `.quant_map`, the nested (double-quant) tensors and a JSON quant state.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    if not modules:
        raise UserError("the model has no NF4 layers to save; quantize it first")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update(_bnb_tensors(name, module.quantized))
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias
    seen = {t.data_ptr() for t in tensors.values()}
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] in modules or tensor.data_ptr() in seen:
            continue  # NF4 buffers are written above; a tied weight once (tie_weights restores it)
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    first = next(iter(modules.values()))
    config = copy.deepcopy(model.config)
    config.quantization_config = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": first.absmax_scale is not None,
        "bnb_4bit_compute_dtype": str(first.dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": [n for n, m in model.named_modules() if isinstance(m, nn.Linear)],
    }
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def _bnb_tensors(name: str, q: NF4Tensor) -> dict[str, torch.Tensor]:
    key = f"{name}.weight"
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": str(q.dtype).removeprefix("torch."),
             "shape": list(q.shape)}
    out = {key: q.packed.view(-1, 1), f"{key}.absmax": q.absmax, f"{key}.quant_map": NF4_LEVELS.clone()}
    if q.double_quant:
        state.update(nested_blocksize=ABSMAX_BLOCKSIZE, nested_dtype="float32", nested_offset=q.absmax_offset.item())
        out.update({f"{key}.nested_absmax": q.absmax_scale, f"{key}.nested_quant_map": dynamic_code().clone()})
    out[f"{key}.{QUANT_STATE}"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


def is_quantized(directory: str | Path) -> bool:
    """Whether `directory` holds an NF4 model in bitsandbytes' 4-bit serialization."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text()).get("quantization_config") or {}
    return config.get("quant_method") == "bitsandbytes" and config.get("bnb_4bit_quant_type") == "nf4"


def stored_groups(stored) -> dict[str, list[str]]:
    """module name -> the keys of its NF4 weight (codes, constants, code tables, quant state), for the
    tensors of a saved NF4 directory (any mapping whose keys are the stored names)."""
    groups = {}
    for key in stored:
        if key.endswith(f".weight.{QUANT_STATE}"):
            weight = key[: -len(f".{QUANT_STATE}")]
            groups[weight.rpartition(".")[0]] = [k for k in stored if k == weight or k.startswith(weight + ".")]
    return groups


def from_bnb(tensors: dict[str, torch.Tensor], key: str, dtype: torch.dtype) -> NF4Tensor:
    """The NF4Tensor stored under `key` in bitsandbytes' serialization (`tensors` holds its group of
    keys), dequantizing into `dtype`."""
    try:
        state = json.loads(bytes(tensors[f"{key}.{QUANT_STATE}"].tolist()))
        q = NF4Tensor(tensors[key].reshape(-1), tensors[f"{key}.absmax"], torch.Size(state["shape"]), dtype,
                      int(state["blocksize"]))
        if f"{key}.nested_absmax" in tensors:
            q.absmax_scale = tensors[f"{key}.nested_absmax"]
            q.absmax_offset = torch.tensor(state["nested_offset"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise UserError(f"the NF4 weight {key} is stored incompletely or with a broken quant state; "
                        "the directory is corrupt, quantize the base again") from None
    blocks = -(-q.numel() // q.blocksize)
    if (state.get("quant_type") != "nf4" or q.blocksize not in BLOCKSIZES or q.packed.dtype != torch.uint8
            or q.packed.numel() != -(-q.numel() // 2) or q.absmax.numel() != blocks):
        raise UserError(f"the NF4 weight {key} does not hold NF4 codes for its shape; the directory is corrupt")
    return q


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4,
                "I32": 4, "F64": 8, "I64": 8}


def saved_memory(directory: str | Path) -> BaseMemory:
    """`base_memory` of a saved model, from its safetensors headers and NF4 quant states (no weights read).

    The NF4 code tables stored with each layer are format constants and are not counted.
    """
    from safetensors import safe_open

    total = {"params": 0, "bytes": 0, "nf4_params": 0, "nf4_bytes": 0}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            weights = {k[: -len(f".{QUANT_STATE}")]: json.loads(bytes(f.get_tensor(k).tolist()))
                       for k in f.keys() if k.endswith(f".{QUANT_STATE}")}
            total["nf4_params"] += sum(math.prod(state["shape"]) for state in weights.values())
            total["nf4_bytes"] += sum(4 for state in weights.values() if "nested_offset" in state)  # fp32 in JSON
            for key in f.keys():
                if key.endswith(("quant_map", QUANT_STATE)):
                    continue
                info = f.get_slice(key)
                size = math.prod(info.get_shape()) * _DTYPE_BYTES[info.get_dtype()]
                if key in weights or key.rpartition(".")[0] in weights:
                    total["nf4_bytes"] += size
                else:
                    total["params"] += math.prod(info.get_shape())
                    total["bytes"] += size
    return BaseMemory(params=total["params"] + total["nf4_params"], bytes=total["bytes"] + total["nf4_bytes"],
                      nf4_params=total["nf4_params"], nf4_bytes=total["nf4_bytes"])


def no_init():
    """transformers' context that skips weight init (the weights come from a file)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
