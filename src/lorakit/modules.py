"""Finding and replacing a model's modules by name: helpers every module above `errors` may use.

    matches(["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj")   # PEFT's name rule -> True
    parse_names("q_proj,v_proj")  # -> ["q_proj", "v_proj"];  parse_names(".*_proj") -> ".*_proj" (a regex)
    set_module(model, "model.layers.0.mlp.down_proj", wrapper)          # in place, by dotted name
    walk(model, stop=(SomeWrapper,))   # named_modules' (name, module) pairs, not inside `stop` types
    output_head(model)                                                   # the LM head, or None

No torch-heavy work and no import of any other lorakit module, so quantization, injection and
loading can all share one definition of each rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

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


def walk(model: nn.Module, stop: type | tuple[type, ...] = ()) -> Iterator[tuple[str, nn.Module]]:
    """(dotted name, module) for `model` and every submodule, in `named_modules` order and each module once,
    but not inside modules of the `stop` types (they are listed, their children are not).

    One explicit stack instead of named_modules' generator per level, whose cost grows with the depth: the
    adapter load path walks the model several times, and with the wrappers' insides left out a walk takes
    a quarter of the time.
    """
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if not isinstance(module, stop):
            prefix = name + "." if name else ""
            stack.extend((prefix + key, child) for key, child in reversed(module._modules.items()) if child is not None)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule with dotted name `name` is (name '' is not allowed: the model itself)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps the last hidden state to logits (transformers' output embeddings), if any."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None
