"""fp32 products with a frozen weight through oneDNN, where it was timed faster than torch's BLAS.

torch runs an fp32 `F.linear` or `@` on a CPU through its BLAS (MKL in the PyPI wheels), and MKL picks
its code by the CPU's vendor: on an AMD EPYC (Zen 5, AVX-512) guest with torch 2.13, MKL's fp32 products
ran at about half the speed of oneDNN's (which torch also ships, and uses for bf16) on every training
shape of the Qwen2-0.5B model: 2048x896 by 4864x896, forward 145 ms against 60, the input gradient 100
against 47 (BENCHMARKS.md). Where MKL is the faster one (Intel CPUs), nothing changes.

The products that carry a LoRA training step (a LoRA layer's frozen base forward and its input
gradient, `lorakit.layers.FusedLoraLinear`; the output head in the chunked loss, `lorakit.losses`)
call `linear` and `grad_input` here. They take oneDNN only inside `onednn_fp32(True)`, for fp32 CPU
tensors outside autocast; anything else is the plain torch op. `lorakit train` decides at startup
(`choose`: the model's own Linear shapes timed both ways, or `LORAKIT_ONEDNN_FP32=0|1`) and keeps the
choice in its checkpoint, so a resumed run multiplies as the interrupted one did. The two differ by
fp32 rounding only (summation order: ~1e-6 relative).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.base import time_both
from lorakit.errors import UserError

ENV = "LORAKIT_ONEDNN_FP32"
TIMED_ROWS = 256  # rows of the timed products (a training step's are thousands: the ratio holds there)
TIMED_OUT = 4096  # a weight is timed on at most this many of its output rows (a 151,936-word head: a slice)

_onednn = False  # inside `onednn_fp32(True)`


def available() -> bool:
    return torch.backends.mkldnn.is_available()


@contextlib.contextmanager
def onednn_fp32(enabled: bool) -> Iterator[None]:
    """Within: `linear` and `grad_input` run fp32 CPU products through oneDNN if `enabled`."""
    global _onednn
    before, _onednn = _onednn, bool(enabled) and available()
    try:
        yield
    finally:
        _onednn = before


def _routed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_onednn and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.dim() == 2 and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ (+ bias), x (N, in), W (out, in): `F.linear`, or oneDNN's fp32 product inside `onednn_fp32`.
    No autograd: for the forward of an autograd Function (or no-grad code)."""
    if _routed(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def grad_input(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g·W, g (N, out), W (out, in): the input gradient of a product with the frozen W (N, in)."""
    if _routed(g, weight):
        return torch.ops.mkldnn._linear_pointwise(g, weight.t(), None, "none", [], "")
    return g @ weight


def setting() -> bool | None:
    """`LORAKIT_ONEDNN_FP32` as True / False, or None where it is unset (the timing decides)."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise UserError(f"{ENV}={value!r} is not 0 or 1; set it to 1 (fp32 products through oneDNN), 0 (through "
                        "torch's BLAS), or unset it (timed at startup)")
    return None if not value else value == "1"


def frozen_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of `model`'s frozen fp32 CPU 2-D Linear weights, largest first."""
    shapes = {tuple(m.weight.shape) for m in model.modules()
              if isinstance(m, nn.Linear) and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 2
              and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" and not m.weight.requires_grad}
    return sorted(shapes, key=lambda s: -s[0] * s[1])


@torch.no_grad()
def choose(model: nn.Module, trials: int = 3) -> bool:
    """Whether `model`'s fp32 training products should run through oneDNN here: `setting()` if given;
    else both ways timed (forward and input gradient, `TIMED_ROWS` rows, each of the model's frozen
    Linear shapes up to `TIMED_OUT` outputs; best of `trials`, alternating), the faster wins. False
    where there is nothing to time, or no oneDNN."""
    forced = setting()
    if forced is not None:
        return forced and available()
    shapes = frozen_shapes(model)
    if not shapes or not available():
        return False
    g = torch.Generator().manual_seed(0)
    cases = []
    for out, inp in shapes:
        out = min(out, TIMED_OUT)
        cases.append((torch.randn(TIMED_ROWS, inp, generator=g), torch.randn(out, inp, generator=g) * 0.02,
                      torch.randn(TIMED_ROWS, out, generator=g)))

    def run(onednn: bool):
        def products():
            with onednn_fp32(onednn):
                for x, w, gy in cases:
                    linear(x, w)
                    grad_input(gy, w)
        return products

    blas, onednn = time_both(run(False), run(True), trials)
    return onednn < blas
