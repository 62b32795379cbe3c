"""`LoraConfig`: what to adapt and how, with PEFT's field names, defaults and JSON.

An `adapter_config.json` written by PEFT loads here and ours loads in PEFT. Fields from newer PEFT
versions that we do not know are kept in `extra` and written back unchanged; fields whose meaning we
do not implement (DoRA, LoftQ, ...) are refused when set, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.files import atomic_write_bytes

CONFIG_NAME = "adapter_config.json"

# Sensible targets when `target_modules` is None, by transformers `model_type` (PEFT's defaults).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
}

# PEFT fields we do not implement, with the value that means "feature off". Any other value is refused.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "arrow_config": None,
    "use_bdlora": None,
}
# Fields PEFT writes that carry no meaning for us; kept so the JSON round-trips.
_PASSTHROUGH_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "inference_mode": False,
    "revision": None,
    "auto_mapping": None,
    "megatron_core": "megatron.core",
}


@dataclass
class LoraConfig:
    """Where to put LoRA updates and how big they are. Field names and defaults follow PEFT's LoraConfig."""

    r: int = 8
    """Rank of the update ΔW = s·B·A: A is (r, in), B is (out, r)."""
    lora_alpha: float = 8
    """Scale numerator: s = lora_alpha / r (or lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training, in [0, 1)."""
    target_modules: list[str] | str | None = None
    """Module names (exact or '.'-suffix), a regex matched against the full name, or "all-linear"."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, matched like target_modules."""
    bias: str = "none"
    """Which biases train and are saved: "none", "all" or "lora_only" (biases of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised scale lora_alpha / sqrt(r), better for large r."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zero (adapter starts as a no-op); "gaussian": A ~ N(0, 1/r); False: both random."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex of a name suffix: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex of a name suffix: alpha}."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt these layer indices (with a list of target names)."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list holding the index, e.g. "layers" or "h"."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    fan_in_fan_out: bool = False
    """Base weight stored as (in, out), like GPT-2's Conv1D; set automatically for Conv1D."""
    base_model_name_or_path: str | None = None
    """The base this adapter was trained on (path or hub id); recorded, checked when known."""
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON fields we do not interpret (PEFT bookkeeping, newer versions), written back unchanged."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise UserError(f"r must be a positive integer, got {self.r!r}")
        if not _positive_number(self.lora_alpha):
            raise UserError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise UserError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise UserError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False or 'gaussian'"
            )
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(
                self.target_modules
            )
            if not self.target_modules:
                raise UserError("target_modules is empty; name at least one module, e.g. ['q_proj', 'v_proj']")
        elif isinstance(self.target_modules, str) and not self.target_modules.strip():
            raise UserError("target_modules is an empty string; name modules or use 'all-linear'")
        patterns = [("target_modules", self.target_modules), ("exclude_modules", self.exclude_modules),
                    *(("rank_pattern", k) for k in self.rank_pattern), *(("alpha_pattern", k) for k in self.alpha_pattern)]
        for field_name, pattern in patterns:
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise UserError(f"{field_name} {pattern!r} is not a valid regular expression ({err})") from None
        for name, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise UserError(f"rank_pattern[{name!r}] must be a positive integer, got {rank!r}")
        for name, alpha in self.alpha_pattern.items():
            if not _positive_number(alpha):
                raise UserError(f"alpha_pattern[{name!r}] must be a positive number, got {alpha!r}")
        for key, off in _UNSUPPORTED_DEFAULTS.items():
            value = self.extra.get(key, off)
            if value != off and not (off is None and value in ({}, [], False)):
                raise UserError(f"{key}={value!r} is not supported by lorakit; this adapter needs PEFT for it")
        peft_type = self.extra.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise UserError(f"peft_type is {peft_type!r}; lorakit loads LoRA adapters only (peft_type 'LORA')")

    # -- scaling ------------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        """s in ΔW = s·B·A for this module: alpha/r, or alpha/sqrt(r) with rslora."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json layout (unsupported features written as 'off')."""
        out: dict[str, Any] = {**_PASSTHROUGH_DEFAULTS, **_UNSUPPORTED_DEFAULTS, **self.extra}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        if not isinstance(data, dict):
            raise UserError(f"adapter config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "LoraConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise UserError(f"{path} not found: an adapter directory needs {CONFIG_NAME} (PEFT layout)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid JSON ({err}); re-save the adapter") from None
        return cls.from_dict(data)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: the first pattern that matches a '.'-aligned suffix of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
