"""Initialisations of A and B beyond LoRA's (A random, B = 0), as PEFT 0.21 defines them, and the
conversion that makes the base-changing ones portable.

    orthogonal       A, B random with orthogonal rows/columns from one r x r QR (r even); B·A ≠ 0 at the start
    pissa            A, B from the top-r singular triplets of W:  W = U·S·Vᵀ,  B = U_r·√(S_r/s),  A = √(S_r/s)·V_rᵀ
    pissa_niter_N    the same from a randomised SVD with N subspace iterations (faster, approximate)
    olora            A, B from the QR of W:  W = Q·R,  B = Q_r,  A = R_r
    (PiSSA and OLoRA then set the base to the residual W - s·B·A, so the model starts as the base)

PiSSA and OLoRA change the base weights. The trained adapter (A, B) therefore applies to the residual,
not to the base a user has. `convert` turns it into a plain LoRA adapter of rank 2r for the original
base, as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` does:

    W_res + s·B·A = W + s·(B·A - B₀·A₀) = W + s·[B | -B₀]·[A ; A₀]
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.nf4 import NF4Linear



def changes_base(init: bool | str) -> bool:
    """Whether a new adapter initialised as `init` rewrites the base weight (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in ("pissa", "olora") or niter(init) is not None)


def niter(init: str) -> int | None:
    """N of 'pissa_niter_N' (None for anything else)."""
    match = re.fullmatch(r"pissa_niter_(\d+)", init)
    return int(match.group(1)) if match else None


@torch.no_grad()
def orthogonal(A: torch.Tensor, B: torch.Tensor) -> None:
    """PEFT's orthogonal init into A (r, in) and B (out, r): rows of one r x r orthogonal Q, split odd/even."""
    r = A.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(r, r))  # (r, r)
    q_odd, q_even = Q[0::2, :], Q[1::2, :]  # (r/2, r) each
    A.copy_((torch.randn(A.shape[1], r // 2) @ q_odd).t() / 10.0)  # (r, in)
    B.copy_(torch.randn(r // 2, B.shape[0]).t() @ q_even / 10.0)  # (out, r)


@torch.no_grad()
def from_weight(init: str, W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of PiSSA or OLoRA from the base weight W (out, in), fp32, with s·B·A ≈ W's top part."""
    W = W.float()
    if init == "olora":
        Q, R = torch.linalg.qr(W)  # (out, k), (k, in)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    n = niter(init)
    if n is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, r, niter=n)  # (out, r), (r,), (in, r)
        Vh = V.t()
    S = S / scaling  # s·B·A = U_r·S_r·V_rᵀ
    return torch.diag(S.sqrt()) @ Vh, U @ torch.diag(S.sqrt())


def check(config: LoraConfig, targets: dict[str, nn.Module], shared: set[int] = frozenset()) -> None:
    """Refuse what `config`'s initialisation cannot do on `targets` (name -> base layer), before anything changes.
    `shared`: ids of the parameters that more than one module holds (tied weights)."""
    init = config.init_lora_weights
    if not config.init_is_trainable():
        raise UserError(f"init_lora_weights={init!r} needs PEFT's own preprocessing over data or a quantizer; lorakit "
                        "loads adapters made with it but trains with True, 'gaussian', 'orthogonal', 'pissa', "
                        "'pissa_niter_N' or 'olora'")
    if init == "orthogonal":
        odd = [n for n in targets if config.rank_for(n) % 2]
        if odd:
            raise UserError(f"init 'orthogonal' needs an even rank (as PEFT); {odd[0]!r} has r={config.rank_for(odd[0])}")
    if not changes_base(init):
        return
    if config.use_dora:
        raise UserError(f"init {init!r} with DoRA is not supported: the conversion back to the original base is "
                        "exact for plain LoRA only; drop one of them")
    for name, module in targets.items():
        if isinstance(module, nn.Embedding):
            raise UserError(f"init {init!r} works on Linear and Conv1D layers (as PEFT); {name!r} is an Embedding")
        if id(getattr(module, "weight", None)) in shared:  # its residual would replace the input embedding too
            raise UserError(f"init {init!r} rewrites the base weight, and {name!r} shares its weight with another "
                            "module (an output head tied to the input embedding); leave it out of the targets "
                            "(e.g. --targets all-linear) or use another --init")
        if isinstance(module, NF4Linear):
            raise UserError(f"init {init!r} rewrites the base weight, which is quantized here (as PEFT, initialise "
                            "in full precision); leave out --quantize or use another --init")


def convert(config: LoraConfig, trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> tuple[
        LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA / OLoRA adapter (trained tensors and those at initialisation, PEFT keys) as a plain LoRA adapter of
    rank 2r for the original base (the module docstring's identity); the config's alphas keep each s."""
    tensors = {}
    for key, value in trained.items():
        if key.endswith(".lora_A.weight"):
            tensors[key] = torch.cat([value, initial[key]], dim=0)  # (2r, in)
        elif key.endswith(".lora_B.weight"):
            tensors[key] = torch.cat([value, -initial[key]], dim=1)  # (out, 2r)
        else:
            tensors[key] = value
    # s = alpha / r (or alpha / sqrt(r)) stays the same at rank 2r:
    factor = math.sqrt(2) if config.use_rslora else 2
    data = config.to_dict()
    data.update(init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * factor,
                rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})
    return LoraConfig.from_dict(data), tensors


def initial_state(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of adapter `name`'s A and B as initialised, kept for `convert`."""
    return layer.lora_A[name].detach().clone(), layer.lora_B[name].detach().clone()
