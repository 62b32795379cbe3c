"""lorakit: Low-Rank Adaptation for language models.

    import lorakit
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, "adapters/legal")          # PEFT layout
    lorakit.load_adapter(model, "adapters/poetry", adapter="poetry")
    lorakit.set_adapters(model, {"default": 1.0, "poetry": 0.5})
    lorakit.quantize(model, "nf4")                         # QLoRA: a 4-bit base (before inject)

Names are imported on first use, so `lorakit bigram ...` and `lorakit --help` do not pay for
importing torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LoraConfig": "lorakit.config",
    "UserError": "lorakit.errors",
    "LoraLayer": "lorakit.layers",
    "active_adapters": "lorakit.adapters",
    "adapter_configs": "lorakit.adapters",
    "delete_adapter": "lorakit.adapters",
    "disable_adapters": "lorakit.adapters",
    "inject": "lorakit.adapters",
    "lora_layers": "lorakit.adapters",
    "merge": "lorakit.adapters",
    "per_row_adapters": "lorakit.adapters",
    "set_adapters": "lorakit.adapters",
    "trainable_parameters": "lorakit.adapters",
    "unload": "lorakit.adapters",
    "unmerge": "lorakit.adapters",
    "adapter_state_dict": "lorakit.io",
    "load_adapter": "lorakit.io",
    "read_adapter": "lorakit.io",
    "install_adapter": "lorakit.io",
    "save_adapter": "lorakit.io",
    "write_adapter": "lorakit.io",
    "Adapter": "lorakit.algebra",
    "combine": "lorakit.algebra",
    "merge_export": "lorakit.export",
    "inspect_adapter": "lorakit.inspection",
    "diff_adapters": "lorakit.inspection",
    "quantize": "lorakit.nf4",
}
# submodules reachable as attributes (`lorakit.nf4.quantize(weight)`) without importing them by hand
_SUBMODULES = ("nf4",)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"lorakit.{name}")
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
