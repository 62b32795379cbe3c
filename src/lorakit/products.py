"""fp32 products with a frozen weight through oneDNN, on CPUs where torch's BLAS (MKL) is slower.

torch runs an fp32 `F.linear` or `@` on a CPU through its BLAS (MKL in the PyPI wheels), and MKL picks
its code by the CPU's vendor: on an AMD EPYC (Zen 5, AVX-512) guest with torch 2.13, MKL's fp32 products
ran at about half the speed of oneDNN's (which torch also ships, and uses for bf16) on every training
shape of the Qwen2-0.5B model: 2048x896 by 4864x896, forward 145 ms against 60, the input gradient 100
against 47 (BENCHMARKS.md). With both capped at AVX2 (an AVX2-only AMD host imitated on that Zen 5), a
whole 0.5B training step still ran 1.08x faster through oneDNN, at 0.45-0.6 GB less peak memory; the embedded
base's steps were alike. Intel CPUs, and AMD ones without AVX2 and FMA, stay with MKL (Intel's own;
not measured against oneDNN).

The products that carry a LoRA training step (a LoRA layer's frozen base forward and its input
gradient, `lorakit.fused.FusedLoraLinear` and DoRA's fused path; the output head in the chunked loss,
`lorakit.losses`) call `linear` and `grad_input` here. They take oneDNN only inside `onednn_fp32(True)`,
for fp32 CPU tensors outside autocast; anything else is the plain torch op. `lorakit train` decides at startup
(`choose`: by the CPU's vendor and flags, or `LORAKIT_ONEDNN_FP32=0|1`) and keeps the choice in its
checkpoint, so a run resumed on another machine multiplies as the interrupted one did. The two differ by
fp32 rounding only (summation order: ~1e-6 relative). `generate` and `eval` pack fp32 weights for oneDNN
where `choose()` (`lorakit.packed`); `serve` where `choose(serving=True)`, which the CPU answers for AMD with
AVX-512 only: on the imitated AVX2 host, the server's own few-row MKL product
(`lorakit.serve.decoder.transposed_faster`) was as fast as packed weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator

import torch
import torch.nn.functional as F

from lorakit.base import cpu_info, onednn_linear
from lorakit.errors import UserError

ENV = "LORAKIT_ONEDNN_FP32"

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
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def grad_input(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g·W, g (N, out), W (out, in): the input gradient of a product with the frozen W (N, in)."""
    if _routed(g, weight):
        return onednn_linear(g, weight.t())
    return g @ weight


def setting() -> bool | None:
    """`LORAKIT_ONEDNN_FP32` as True / False, or None where it is unset (the CPU decides)."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise UserError(f"{ENV}={value!r} is not 0 or 1; set it to 1 (fp32 products through oneDNN), 0 (through "
                        "torch's BLAS), or unset it (the CPU decides)")
    return None if not value else value == "1"


def cpu_prefers_onednn(serving: bool = False) -> bool:
    """Whether this CPU runs fp32 products faster through oneDNN than through MKL (`prefers_onednn`)."""
    return prefers_onednn(*cpu_info(), serving=serving)


def prefers_onednn(vendor: str, flags: Collection[str], serving: bool = False) -> bool:
    """AMD with AVX-512: MKL ran every 0.5B training product at about half oneDNN's speed on a Zen 5, and
    2-4x slower at a decode step's few rows (BENCHMARKS.md). AMD with AVX2 and FMA only (imitated on the
    Zen 5 with both libraries capped at AVX2; not yet measured on a real AVX2-only host): a 0.5B training
    step 1.08x faster through oneDNN, `generate` 1.2-1.4x with packed weights; but not for `serving`,
    whose transposed MKL product (`lorakit.serve.decoder.transposed_faster`) was as fast as packed weights.
    Intel: MKL is Intel's own (not measured against oneDNN): kept."""
    if vendor != "AuthenticAMD":
        return False
    return "avx512f" in flags or (not serving and "avx2" in flags and "fma" in flags)


def choose(serving: bool = False) -> bool:
    """Whether fp32 products run through oneDNN here: in training and in the packed weights of `generate`
    and `eval`, or with `serving`, in those of `serve`. `setting()` if given, else `cpu_prefers_onednn`;
    False without oneDNN. Decided by the CPU, not timed: timing flips between runs where the two are close,
    and the same command on the same machine must train the same adapter."""
    forced = setting()
    if not available():
        return False
    return forced if forced is not None else cpu_prefers_onednn(serving)
