"""Finding and replacing a model's modules by name: helpers every module above `errors` may use.

    matches(["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj")   # PEFT's name rule -> True
    parse_names("q_proj,v_proj")  # -> ["q_proj", "v_proj"];  parse_names(".*_proj") -> ".*_proj" (a regex)
    set_module(model, "model.layers.0.mlp.down_proj", wrapper)          # in place, by dotted name
    output_head(model)                                                   # the LM head, or None

No torch-heavy work and no import of any other lorakit module, so quantization, injection and
loading can all share one definition of each rule.
"""

from __future__ import annotations

import re

from torch import nn

try:  # transformers' GPT-2 style linear with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    Conv1D = ()


def matches(names: list[str] | str, key: str) -> bool:
    """PEFT's rule: a string is a regex over the full name; a list matches exactly or as a '.'-suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith("." + n) for n in names)


def parse_names(text: str) -> list[str] | str:
    """A command line's module selection: 'q_proj,v_proj' (names, dotted allowed) -> a list; anything
    else (e.g. '.*_proj', 'all-linear') is kept as the string, which `matches` reads as a regex."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names if names and all(n.replace(".", "_").isidentifier() for n in names) else text


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule with dotted name `name` is (name '' is not allowed: the model itself)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps the last hidden state to logits (transformers' output embeddings), if any."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None
