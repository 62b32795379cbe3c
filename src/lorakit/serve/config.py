"""The settings of `lorakit serve` (each field's help is its --help) and the rule for adapter names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.base import base_option, dtype_option, quantize_option, quantize_spec
from lorakit.errors import UserError
from lorakit.options import option

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = ("adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
             "starting with a letter or digit")


def valid_name(name) -> bool:
    return isinstance(name, str) and NAME.match(name) is not None


@dataclass
class ServeConfig:
    """Everything `lorakit serve` takes; each field's help is the CLI's --help."""

    base: str | None = base_option()
    adapters: dict[str, str] = option("name -> adapter directory, loaded at start (--adapter NAME=PATH)",
                                      default_factory=dict)
    adapter_dir: Path | None = option("directory that POST /v1/load_lora_adapter may load from (without it, "
                                      "loading is off)", default=None)
    api_key: str | None = option("require 'Authorization: Bearer KEY' on /v1/* (default: $LORAKIT_API_KEY; "
                                 "unset: no key)", default=None)
    host: str = option("address to bind; the default serves this machine only", default="127.0.0.1")
    port: int = option("port", default=8000)
    max_batch: int = option("requests decoded together in one step", default=16)
    max_waiting: int = option("queued requests beyond the batch before answering 429", default=64)
    max_tokens: int = option("most tokens one request may generate", default=512)
    max_body_bytes: int = option("largest request body, in bytes", default=1 << 20)
    max_adapters: int = option("most adapters loaded at once (each widens every adapted layer's stacked copy); "
                               "a load beyond it is refused until one is unloaded", default=16)
    dtype: str = dtype_option()
    quantize: str | None = quantize_option()
    served_model_name: str | None = option("the base's name in the API (default: --base, or lorakit/embedded)",
                                           default=None)

    def __post_init__(self) -> None:
        for name in self.adapters:
            if not valid_name(name):
                raise UserError(NAME_RULE.format(name=name))
        for key in ("max_batch", "max_waiting", "max_tokens", "max_body_bytes", "max_adapters"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if len(self.adapters) > self.max_adapters:
            raise UserError(f"{len(self.adapters)} --adapter given but --max-adapters is {self.max_adapters}; "
                            "raise --max-adapters")
        if self.api_key is not None and not self.api_key.strip():
            # an empty key would turn authentication off without a word: never what was meant
            raise UserError("the API key is empty (--api-key \"\" or an empty $LORAKIT_API_KEY); give a real key, "
                            "or unset LORAKIT_API_KEY and leave out --api-key to serve without one")
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port must be between 1 and 65535, got {self.port}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"unknown dtype {self.dtype!r}; use one of auto, fp32, bf16, fp16")
        quantize_spec(self.quantize)  # --quantize checked
        if self.adapter_dir is not None and not Path(self.adapter_dir).is_dir():
            raise UserError(f"--adapter-dir {self.adapter_dir} is not a directory")
