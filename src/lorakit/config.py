"""`LoraConfig`: what to adapt and how, with PEFT's field names, defaults and JSON.

An `adapter_config.json` written by PEFT loads here and ours loads in PEFT. Fields from newer PEFT
versions that we do not know are kept in `extra` and written back unchanged; fields whose meaning we
do not implement (LoftQ, layer replication, ...) are refused by name when set, never silently
ignored.
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
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "arrow_config": None,
    "use_bdlora": None,
}
# PEFT 0.21 fields that change the maths too but which PEFT does not write when off: refused when set,
# and not added to the JSON we write (older PEFT versions would not know them).
_REFUSED_WHEN_SET: dict[str, Any] = {
    "kasa_config": None,  # KaSA: truncates the base's singular values, adds a learned diagonal
    "monteclora_config": None,  # MonteCLoRA: variational Monte Carlo sampling on top of A and B
    "ensure_weight_tying": False,  # adapters of tied layers share weights
}
# What each refused field would need, for the refusal.
_WHY: dict[str, str] = {
    "use_qalora": "QALoRA pools the input by groups before A",
    "layer_replication": "the base's layers are duplicated before adapting them",
    "target_parameters": "it adapts bare parameters (e.g. MoE expert weights), not layers",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "megatron_config": "its layers are Megatron's parallel linears",
    "arrow_config": "Arrow routes between several adapters per token",
    "use_bdlora": "block-diagonal LoRA shares its factors across shards",
    "kasa_config": "KaSA truncates the base's singular values and adds a learned diagonal",
    "monteclora_config": "MonteCLoRA samples its factors",
    "ensure_weight_tying": "adapters of tied layers share weights",
}
# PEFT fields that do not change the result and are kept as given: velora_config (VeLoRA) changes only
# how the backward stores activations; qalora_group_size matters only with use_qalora (refused);
# eva_config, corda_config, loftq_config and lora_ga_config describe how an initialisation ran (what
# matters when loading is init_lora_weights, below); runtime_config, peft_version and the rest of PEFT's
# bookkeeping are not about the maths.
# init_lora_weights values: what a new adapter can start from here (also "pissa_niter_N")...
TRAINABLE_INITS = (True, False, "gaussian", "orthogonal", "pissa", "olora")
# ... and what adapters saved by PEFT may also say: their inference is plain LoRA on the unchanged base
# (PEFT loads a LoRA-GA adapter onto the unshifted base, as it has no gradients then).
LOADABLE_INITS = ("eva", "lora_ga", "mica")
# Initialisations that rewrite the base weight: an adapter saved with one (not converted) applies to a base
# that PEFT rebuilds when it loads it.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
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
    """Module names (exact or '.'-suffix), a regex matched against the full name, "all-linear" (every
    linear layer but the output head, as PEFT) or "all-linear+head" (and the output head)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, matched like target_modules."""
    bias: str = "none"
    """Which biases train and are saved: "none", "all" or "lora_only" (biases of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised scale lora_alpha / sqrt(r), better for large r."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zero (adapter starts as a no-op); "gaussian": A ~ N(0, 1/r); False: both random;
    "orthogonal", "pissa", "pissa_niter_N", "olora": see lorakit.variants.init."""
    use_dora: bool = False
    """DoRA: a learned magnitude per output feature times the direction W + s·B·A normalised per output
    feature (PEFT's definition; see lorakit.variants.dora)."""
    lora_bias: bool = False
    """A trainable bias on B, added as s·b (PEFT's lora_bias); Linear and Conv1D only, not with DoRA."""
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
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Token ids whose rows train in full beside LoRA (new or changed tokens of a chat fine-tune): a list for
    the input embedding (and the output head tied to it), or {module name: ids} (see lorakit.tokens)."""
    fan_in_fan_out: bool = False
    """Base weight stored as (in, out), like GPT-2's Conv1D; set automatically for Conv1D."""
    base_model_name_or_path: str | None = None
    """The base this adapter was trained on (path or hub id); recorded, checked when known."""
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON fields we do not interpret (PEFT bookkeeping, newer versions), written back unchanged."""

    def __post_init__(self) -> None:
        # Every field checked by type and range here, where a config (and so adapter_config.json) enters:
        # a wrong type must not surface later as a TypeError deep inside matching or allocation.
        self.r = _positive_int("r", self.r)
        self.lora_alpha = _positive_number("lora_alpha", self.lora_alpha)
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout must be a number in [0, 1), got {_show(self.lora_dropout)}")
        if not isinstance(self.bias, str) or self.bias not in ("none", "all", "lora_only"):
            raise UserError(f"bias must be 'none', 'all' or 'lora_only', got {_show(self.bias)}")
        for name in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {_show(getattr(self, name))}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or isinstance(init, str) and (
                init in (*TRAINABLE_INITS, *LOADABLE_INITS, *BASE_CHANGING_INITS) or _is_pissa_niter(init))):
            raise UserError(f"init_lora_weights={_show(init)} is not supported; use True, False, 'gaussian', "
                            "'orthogonal', 'pissa', 'pissa_niter_N' or 'olora'")
        if self.use_dora and self.lora_bias:
            raise UserError("lora_bias is not supported together with use_dora (PEFT refuses it too); drop one")
        if self.lora_bias and not isinstance(init, bool):
            raise UserError(f"lora_bias needs init_lora_weights True or False (as PEFT), got {_show(init)}")
        self.target_modules = _names("target_modules", self.target_modules, empty_ok=False)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules, empty_ok=True)
        self.layers_pattern = _names("layers_pattern", self.layers_pattern, empty_ok=True)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)):
                raise UserError(f"modules_to_save must be a list of module names, got {_show(self.modules_to_save)}")
            self.modules_to_save = [_pattern("modules_to_save", m) for m in self.modules_to_save]
        self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        self.rank_pattern = _pattern_table("rank_pattern", self.rank_pattern, _positive_int)
        self.alpha_pattern = _pattern_table("alpha_pattern", self.alpha_pattern, _positive_number)
        wanted = self.layers_to_transform
        indices = wanted if isinstance(wanted, (list, tuple)) else [] if wanted is None else [wanted]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in indices):
            raise UserError(f"layers_to_transform must be a layer index or a list of them (integers >= 0), "
                            f"got {_show(wanted)}")
        if isinstance(wanted, tuple):
            self.layers_to_transform = list(wanted)
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise UserError(f"base_model_name_or_path must be a string, got {_show(self.base_model_name_or_path)}")
        if not isinstance(self.extra, dict):
            raise UserError(f"extra must be a dict of JSON fields, got {type(self.extra).__name__}")
        for key, value in self.extra.items():  # kept to be written back: each must be valid JSON again
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                raise UserError(f"adapter_config field {key!r} holds {_show(value)}, which JSON cannot hold "
                                "(NaN, Infinity or a non-JSON type); give a finite number, string, list or object"
                                ) from None
        for key, off in {**_UNSUPPORTED_DEFAULTS, **_REFUSED_WHEN_SET}.items():
            value = self.extra.get(key, off)
            if value != off and not (off is None and value in ({}, [], False)):
                raise UserError(f"{key}={_show(value)} is not supported by lorakit ({_WHY[key]}); this adapter "
                                "needs PEFT")
        peft_type = self.extra.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise UserError(f"peft_type is {_show(peft_type)}; lorakit loads LoRA adapters only (peft_type 'LORA')")

    def init_is_trainable(self) -> bool:
        """Whether a new adapter can be initialised as `init_lora_weights` says (not only loaded)."""
        init = self.init_lora_weights
        return isinstance(init, bool) or init in TRAINABLE_INITS or _is_pissa_niter(init)

    def changes_base(self) -> bool:
        """Whether `init_lora_weights` rewrites the base weight (PiSSA, OLoRA, CorDA, LoftQ)."""
        init = self.init_lora_weights
        return isinstance(init, str) and (init in BASE_CHANGING_INITS or _is_pissa_niter(init))

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
        return cls(**kwargs, extra=extra)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def load(cls, directory: str | Path, inside: str | Path | None = None) -> "LoraConfig":
        """The config in `directory`; with `inside`, the file read must lie under that directory."""
        path = Path(directory) / CONFIG_NAME
        if not path.exists() and not path.is_symlink():
            raise UserError(f"{path} not found: an adapter directory needs {CONFIG_NAME} (PEFT layout)")
        from lorakit.files import read_json

        return cls.from_dict(read_json(path, what="adapter config", inside=inside))


def _show(value: Any, limit: int = 80) -> str:
    """A value for an error message, cut short (a config may hold a 5000-digit number or a huge list)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        text = f"an integer of about {value.bit_length() * 3 // 10} digits"
    return text if len(text) <= limit else text[:limit] + "..."


def _is_number(value: Any) -> bool:
    """A real number that is finite as a float (bools are not numbers here; a 400-digit int is not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {_show(value)}")
    return value


def _positive_number(name: str, value: Any) -> float:
    if not _is_number(value) or value <= 0:
        raise UserError(f"{name} must be a positive finite number, got {_show(value)}")
    return value


def _pattern(field_name: str, pattern: Any) -> str:
    """A module name or regular expression: a non-empty string that compiles."""
    if not isinstance(pattern, str) or not pattern:
        raise UserError(f"{field_name} entries must be non-empty strings (module names or regular expressions), "
                        f"got {_show(pattern)}")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise UserError(f"{field_name} {_show(pattern)} is not a valid regular expression ({err})") from None
    return pattern


def _names(field_name: str, value: Any, empty_ok: bool) -> list[str] | str | None:
    """None, a regex string, or a list of names (a set is sorted, so the JSON is stable)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{field_name} is an empty string; name modules or use 'all-linear'")
        return _pattern(field_name, value)
    if isinstance(value, (list, tuple, set)):
        if isinstance(value, set):
            value = sorted(value, key=str)
        names = [_pattern(field_name, v) for v in value]
        if not names and not empty_ok:
            raise UserError(f"{field_name} is empty; name at least one module, e.g. ['q_proj', 'v_proj']")
        return names
    raise UserError(f"{field_name} must be a string (a regex) or a list of module names, got {_show(value)}")


def _pattern_table(field_name: str, value: Any, check) -> dict:
    """rank_pattern / alpha_pattern: {regex of a module name suffix: value}; null means empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{field_name} must be an object {{module pattern: value}}, got {_show(value)}")
    return {_pattern(field_name, k): check(f"{field_name}[{k!r}]", v) for k, v in value.items()}


def _token_indices(value: Any) -> list[int] | dict[str, list[int]] | None:
    """trainable_token_indices: None, a list of token ids, or {module name: list of token ids}; each list
    non-empty and without repeats (two values for one row would leave which one wins to chance)."""
    if value is None or value == [] or value == {}:  # PEFT's "off" too
        return None
    if isinstance(value, dict):
        return {_pattern("trainable_token_indices", k): _token_ids(f"trainable_token_indices[{k!r}]", v)
                for k, v in value.items()}
    return _token_ids("trainable_token_indices", value)


def _token_ids(field_name: str, ids: Any) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in ids):
        raise UserError(f"{field_name} must be a non-empty list of token ids (integers >= 0), got {_show(ids)}")
    seen: set[int] = set()
    for i in ids:  # one pass (a hostile config may list millions of ids)
        if i in seen:
            raise UserError(f"{field_name} lists token id {i} twice; list each id once")
        seen.add(i)
    return list(ids)


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: the first pattern that matches a '.'-aligned suffix of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _is_pissa_niter(init: Any) -> bool:
    return isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", init) is not None
