"""LoRA+ (Hayou et al. 2024): B learns faster than A. The optimizer's parameter groups, as PEFT's
`create_loraplus_optimizer` builds them (peft 0.21, tested to give the same groups):

    group           what                                               lr              weight decay
    A               lora_A, and every other trainable matrix           lr              wd
    embedding       lora_A and lora_B of an adapted Embedding          lr_embedding    wd
    B               lora_B, DoRA magnitudes, other 1-D weights         lr · ratio      wd
    B, no decay     biases (lora_bias too) and LayerNorm weights       lr · ratio      0

The paper's argument: with B = 0 at the start and A random, equal learning rates leave the features
that B·A learns under-trained at large width; a ratio of ~16 is its default.
"""

from __future__ import annotations

from torch import nn

from lorakit.layers import LoraLayer


def loraplus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                    lr_embedding: float = 1e-6) -> list[dict]:
    """The trainable parameters of `model` in LoRA+'s four groups (the table above), for any torch optimizer."""
    A, embedding, B, B_no_decay = [], [], [], []
    seen: set[int] = set()
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim != 1:
                A.append(p)
            elif attr == "bias" or isinstance(module, nn.LayerNorm):
                B_no_decay.append(p)
            else:
                B.append(p)
        if isinstance(module, LoraLayer):  # its adapters live in ParameterDicts below it: sort them by role
            for table, group in ((module.lora_A, A), (module.lora_B, B)):
                for p in table.values():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        (embedding if module.kind == "embedding" else group).append(p)
            for table, group in ((module.lora_magnitude, B), (module.lora_bias, B_no_decay)):
                for p in table.values():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        group.append(p)
    return [{"params": A, "weight_decay": weight_decay, "lr": lr},
            {"params": embedding, "weight_decay": weight_decay, "lr": lr_embedding},
            {"params": B, "weight_decay": weight_decay, "lr": lr * ratio},
            {"params": B_no_decay, "weight_decay": 0.0, "lr": lr * ratio}]
