"""A base model built without memory, then filled from its checkpoint one tensor at a time, NF4 on arrival.

    model = load_streaming(Path("models/llama-7b"), torch.float32, quantize=nf4.QuantizeSpec())

The skeleton is built from the model's config with every parameter on the meta device (no memory,
no random init); the buffers its __init__ computes (rotary `inv_freq`, masks) are real and small.
Then each stored tensor is read on its own (`tensorfiles.Stored.read`) and
- a weight of a Linear chosen for NF4 becomes an `NF4Linear`'s codes at once: its full-precision
  values exist only while they are being quantized (the bytes equal `nf4.quantize` of the model);
- an NF4 weight from a quantized directory (bitsandbytes' serialization) is taken as it is stored;
- anything else is cast to the compute dtype (floats) and put in place.
Weights the model ties (embeddings = output head) are one tensor, set on every name that shares it,
as transformers' `tie_weights` would. Keys a checkpoint may carry for buffers the model computes
itself are skipped; any other key the model lacks, and any weight the checkpoint lacks, is an error.

Peak memory: the model in its final form, plus one tensor in fp32 (the quantizer's working copy).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lorakit import heap, nf4
from lorakit.errors import UserError
from lorakit.modules import set_module
from lorakit.tensorfiles import Stored, stored_tensors


def load_streaming(directory: str | Path, dtype: torch.dtype, device: torch.device | None = None,
                   quantize: nf4.QuantizeSpec | None = None) -> nn.Module:
    """The causal LM in `directory` in `dtype` on `device`, its chosen Linear layers in NF4 if `quantize`
    (a directory written by `lorakit quantize` is NF4 as stored); in eval mode."""
    directory, device = Path(directory), device or torch.device("cpu")
    heap.return_freed_memory()  # a 4-bit base is for small machines: what a step frees goes back to the OS
    config = plain_config(directory)
    stored_nf4 = nf4.is_quantized(directory)
    stored = stored_tensors(directory)
    model = skeleton(config, dtype)
    names = _Names(model, stored, directory)
    chosen = set(nf4.quantize_targets(model, quantize.include)) if quantize else set()
    groups = nf4.stored_groups(stored) if stored_nf4 else {}
    in_group = {key for keys in groups.values() for key in keys}
    done: set[str] = set()
    for key in sorted(stored, key=lambda k: (stored[k].file, stored[k].start)):  # in file order: sequential reads
        if key in done:
            continue
        if key in in_group:
            module = next(m for m, keys in groups.items() if key in keys)
            tensors = {k: stored[k].read() for k in groups[module]}
            done.update(tensors)
            _set_nf4(model, names.module(module), nf4.from_bnb(tensors, f"{module}.weight", dtype), device)
            continue
        if names.skipped(key):
            continue
        tensor, shared = stored[key].read(), None
        for name in names.aliases(key):  # tied names share one parameter, as after tie_weights()
            module, _, leaf = name.rpartition(".")
            if module in chosen and leaf == "weight":
                q = nf4.quantize(tensor, blocksize=quantize.blocksize, double_quant=quantize.double_quant)
                _set_nf4(model, module, q.with_dtype(dtype), device)
            else:
                shared = _put(model, name, tensor if shared is None else shared, dtype, device)
        del tensor
    names.check_complete(model)
    _load_generation_config(model, directory)
    return model.to(device).eval()


def plain_config(directory: Path):
    """The model's config from `directory`; for an NF4 directory without its quantization config (the
    skeleton is a plain model, its NF4 layers come from the file)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the model config in {directory}: {str(err).splitlines()[0]}") from None
    if nf4.is_quantized(directory):
        del config.quantization_config
    return config


class Checkpoint:
    """The stored tensors of `directory`, found by the names of `model`, a `skeleton` of its config:
    with or without the base model's prefix, one stored tensor for tied twins, NF4 weights (bitsandbytes'
    serialization) as their module's weight. Every stored key must fit the model (checked here)."""

    def __init__(self, model: nn.Module, directory: Path):
        self.directory = Path(directory)
        self.stored = stored_tensors(directory)
        self.names = _Names(model, self.stored, self.directory)
        groups = nf4.stored_groups(self.stored) if nf4.is_quantized(directory) else {}
        self.nf4 = {f"{self.names.module(m)}.weight": (m, keys) for m, keys in groups.items()}  # model name -> group
        in_group = {key for _, keys in self.nf4.values() for key in keys}
        self.key = {}  # model name -> the stored key that holds it
        for key in self.stored:
            if key not in in_group and not self.names.skipped(key):  # skipped() refuses keys that fit nothing
                for name in self.names.aliases(key):
                    self.key[name] = key

    def holds(self, name: str) -> bool:
        return name in self.key or name in self.nf4

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of `name` (None for an NF4 weight: its shape is in its quant state)."""
        return self.stored[self.key[name]].shape if name in self.key else None

    def read(self, name: str) -> torch.Tensor:
        """The value of the model's parameter or buffer `name` in its stored dtype, in memory of its own; an NF4
        weight dequantized to fp32 (what a model loaded in fp32 and `nf4.dequantize`d holds)."""
        if name in self.nf4:
            module, keys = self.nf4[name]
            q = nf4.from_bnb({k: self.stored[k].read() for k in keys}, f"{module}.weight", torch.float32)
            return q.dequantize(torch.float32)
        return self.stored[self.key[name]].read()

    def materialize(self, model: nn.Module, names: list[str]) -> None:
        """Give the parameters `names` of `model` (on the meta device) their stored values, in fp32."""
        for name in names:
            if not self.holds(name):
                raise UserError(f"{self.directory}: the weights lack {name}; the model directory is incomplete")
            shared = None
            for alias in self.names.shared.get(name, [name]):  # a tied twin gets the same parameter
                shared = _put(model, alias, self.read(name) if shared is None else shared, torch.float32,
                              torch.device("cpu"))


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """An `AutoModelForCausalLM` for `config` whose parameters are on the meta device, in `dtype`, tied as
    the model ties them; buffers computed in __init__ are real."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta(), nf4.no_init():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as err:
            raise UserError(f"not a causal language model ({str(err).splitlines()[0]}); --base needs a model "
                            "AutoModelForCausalLM can load") from None
    model.tie_weights()
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers goes to the meta device at once (its allocation was never
    touched, so it cost nothing, and the init that follows runs on meta, for free). Buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _Names:
    """Which model tensor a checkpoint key fills, which names share it (tied), and what is left over."""

    def __init__(self, model: nn.Module, stored: dict[str, Stored], directory: Path):
        self.directory = directory
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.state = set(model.state_dict().keys())
        self.shared: dict[str, list[str]] = {}  # name -> every name of the same parameter
        by_id: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(param), []).append(name)
        for group in by_id.values():
            for name in group:
                self.shared[name] = group
        self.ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
        computed = {name for name, _ in model.named_buffers()} - self.state  # non-persistent: __init__ computes them
        self.computed = computed | {f"{self.prefix}.{n}" for n in computed}
        # A tied group is read once, from the first of its names the checkpoint holds.
        self.first_stored = {}
        for key in stored:
            target = self._resolve(key)
            if target is not None:
                self.first_stored.setdefault(tuple(self.shared.get(target, [target])), key)

    def _resolve(self, key: str) -> str | None:
        """The model's name for a checkpoint key (with or without the base model's prefix), or None."""
        if key in self.state:
            return key
        if self.prefix and f"{self.prefix}.{key}" in self.state:
            return f"{self.prefix}.{key}"
        if self.prefix and key.startswith(self.prefix + ".") and key[len(self.prefix) + 1:] in self.state:
            return key[len(self.prefix) + 1:]
        # A tied name that state_dict() lists once (the other name of the same parameter).
        for names in self.shared.values():
            if key in names:
                return key
        return None

    def skipped(self, key: str) -> bool:
        """Keys the model does not load: computed buffers, patterns the model ignores, a tied twin read already."""
        target = self._resolve(key)
        if target is None:
            if key in self.computed or any(p.search(key) for p in self.ignored):
                return True
            raise UserError(f"{self.directory}: {key} fits no weight of this model; is config.json the one "
                            "these weights were saved with?")
        return self.first_stored.get(tuple(self.shared.get(target, [target]))) != key

    def module(self, module: str) -> str:
        target = self._resolve(f"{module}.weight")
        if target is None:
            raise UserError(f"{self.directory}: NF4 weight {module} fits no layer of this model; the directory "
                            "is corrupt")
        return target.rpartition(".")[0]

    def aliases(self, key: str) -> list[str]:
        """Every model name the checkpoint's `key` fills (more than one for tied weights)."""
        target = self._resolve(key)
        return self.shared.get(target, [target])

    def check_complete(self, model: nn.Module) -> None:
        for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
            if tensor.device.type == "meta":
                raise UserError(f"{self.directory}: the weights lack {name}; the model directory is incomplete")


def _put(model: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype,
         device: torch.device) -> torch.Tensor:
    """Set parameter or buffer `name` to `value` (a float parameter in `dtype`; a buffer keeps its dtype);
    returns what was set, so a tied twin can be given the same parameter."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    old = module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]
    if tuple(old.shape) != tuple(value.shape):
        raise UserError(f"{name} is {tuple(value.shape)} in the checkpoint but the model needs {tuple(old.shape)}; "
                        "is config.json the one these weights were saved with?")
    if leaf in module._buffers:
        module._buffers[leaf] = value.to(device, old.dtype)
        return module._buffers[leaf]
    if not isinstance(value, nn.Parameter):
        value = value.to(device, dtype if value.is_floating_point() else value.dtype)
        value = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    module._parameters[leaf] = value
    return value


def _set_nf4(model: nn.Module, name: str, q: nf4.NF4Tensor, device: torch.device) -> None:
    """Replace Linear `name` with an NF4Linear of `q`; its bias (loaded or still to come) carries over."""
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != tuple(q.shape):
        raise UserError(f"NF4 weight {name} of shape {tuple(q.shape)} does not fit the model's "
                        f"{type(old).__name__}; the directory is corrupt")
    bias = None if old.bias is None else nn.Parameter(old.bias.detach(), requires_grad=False)
    set_module(model, name, nf4.NF4Linear(q, bias).to(device))


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    """generation_config.json as from_pretrained reads it (eos ids, sampling defaults)."""
    if not (directory / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError, json.JSONDecodeError):
        pass  # a broken generation config is not worth refusing a model; generate's defaults apply
