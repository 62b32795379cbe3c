"""lorakit: Low-Rank Adaptation for language models.

    import lorakit
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, "adapters/legal")          # PEFT layout
    lorakit.load_adapter(model, "adapters/poetry", adapter="poetry")
    lorakit.set_adapters(model, {"default": 1.0, "poetry": 0.5})
"""

from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.inject import (
    active_adapters,
    adapter_configs,
    delete_adapter,
    disable_adapters,
    inject,
    lora_layers,
    merge,
    per_row_adapters,
    set_adapters,
    trainable_parameters,
    unload,
    unmerge,
)
from lorakit.io import adapter_state_dict, load_adapter, read_adapter, save_adapter, write_adapter
from lorakit.layers import LoraLayer

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraLayer",
    "UserError",
    "active_adapters",
    "adapter_configs",
    "adapter_state_dict",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "load_adapter",
    "lora_layers",
    "merge",
    "per_row_adapters",
    "read_adapter",
    "save_adapter",
    "set_adapters",
    "trainable_parameters",
    "unload",
    "unmerge",
    "write_adapter",
]
