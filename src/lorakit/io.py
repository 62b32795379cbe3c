"""Adapters on disk, in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (Linear, Conv1D),
`...lora_embedding_A` / `...lora_embedding_B` (Embedding), `...lora_magnitude_vector` (DoRA's m),
`...lora_B.bias` (`lora_bias`), `<path>.base_layer.bias` for biases of adapted layers,
`<path>.token_adapter.trainable_tokens_delta` for trainable token rows (k, dim) and `<path>.<param>` for
the rest (`bias="all"`, `modules_to_save`). Files are written
atomically (temp file + rename) and read without pickle; `adapter_model.bin` is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lorakit.adapters import Plan, adapter_configs, inject, lora_layers, plan_injection, set_adapters, transaction
from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.errors import UserError
from lorakit.files import atomic_write_bytes, check_directory, read_bytes
from lorakit.layers import LoraLayer, SavedModule, base_kind, layer_dims
from lorakit.modules import matches, walk
from lorakit.options import option
from lorakit.tokens import TokenLayer
from lorakit.variants import init as variant_init

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
LINEAR_FACTORS = (".lora_A.weight", ".lora_B.weight")  # key suffixes of A and B for Linear and Conv1D
EMBEDDING_FACTORS = (".lora_embedding_A", ".lora_embedding_B")  # ... and for Embedding (bare tensors)
FACTOR_SUFFIXES = dict((LINEAR_FACTORS, EMBEDDING_FACTORS))  # A's suffix -> B's
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's magnitude m (out,), for every kind of base
LORA_BIAS = ".lora_B.bias"  # lora_bias: B's bias (out,)
EMBEDDING_COPY = ".base_layer.weight"  # PEFT's copy of a whole base embedding matrix ("in case it was resized")
TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"  # trainable_token_indices: the k rows' values (k, dim)


def factor_keys(module: str, embedding: bool) -> tuple[str, str]:
    """PEFT's keys of module `module`'s A and B ('base_model.model.<module>.lora_A.weight', ...)."""
    a, b = EMBEDDING_FACTORS if embedding else LINEAR_FACTORS
    return f"{PREFIX}{module}{a}", f"{PREFIX}{module}{b}"


# -- tensors on disk ------------------------------------------------------------------------------


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"format": "pt", **(metadata or {})}))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors. Adapter-sized files are read whole and parsed from memory, which
    is faster here than safetensors' per-tensor reads from a memory map."""
    return parse_tensors(read_bytes(path, "safetensors file"), path)


# -- model <-> PEFT keys --------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for `adapter`, under PEFT's key names (views, not copies)."""
    configs = adapter_configs(model)
    if adapter not in configs:
        raise UserError(f"no adapter named {adapter!r}; the model has {sorted(configs) or 'none'}")
    return {key: param for key, param in _peft_params(model, adapter, configs[adapter])}


def _peft_params(model: nn.Module, adapter: str, config: LoraConfig):
    """(PEFT key, live parameter) pairs for everything that belongs to `adapter` in the file."""
    for name, module in walk(model, stop=(LoraLayer, TokenLayer, SavedModule)):  # not inside a wrapper
        if isinstance(module, LoraLayer):
            if adapter in module.lora_A:
                a, b = factor_keys(name, embedding=module.kind == "embedding")
                yield a, module.lora_A[adapter]
                yield b, module.lora_B[adapter]
                if adapter in module.lora_magnitude:
                    yield f"{PREFIX}{name}{MAGNITUDE}", module.lora_magnitude[adapter]
                if adapter in module.lora_bias:
                    yield f"{PREFIX}{name}{LORA_BIAS}", module.lora_bias[adapter]
            bias = getattr(module.base, "bias", None)
            if bias is not None and (config.bias == "all" or (config.bias == "lora_only" and adapter in module.lora_A)):
                yield f"{PREFIX}{name}.base_layer.bias", bias
        elif isinstance(module, TokenLayer):
            if adapter in module.values and adapter not in module.shared:  # a tied head's rows are the embedding's
                yield f"{PREFIX}{name}{TOKEN_ROWS}", module.values[adapter]
        elif isinstance(module, SavedModule):
            if adapter in module.copies:
                for key, tensor in module.copies[adapter].state_dict(keep_vars=True).items():
                    yield f"{PREFIX}{name}.{key}", tensor
        elif config.bias == "all":
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                yield f"{PREFIX}{name}.bias" if name else f"{PREFIX}bias", bias


# -- save / load ----------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path, adapter: str = "default") -> Path:
    """Write `adapter` as `adapter_config.json` + `adapter_model.safetensors` (PEFT layout).

    An adapter initialised by PiSSA or OLoRA (which rewrote the base weights) is written for the original
    base, as a plain LoRA adapter of twice the rank (`portable_adapter`). Each file is replaced atomically;
    an interrupted save leaves the previous files intact.
    """
    return write_adapter(directory, *portable_adapter(model, adapter))


def portable_adapter(model: nn.Module, adapter: str = "default") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """`adapter`'s config and PEFT-keyed tensors as they apply to the original base: as they are, or for a
    PiSSA / OLoRA adapter converted as PEFT's `path_initial_model_for_weight_conversion` does."""
    tensors = adapter_state_dict(model, adapter)
    config = adapter_configs(model)[adapter]
    initial = {}
    for name, layer in lora_layers(model):
        if adapter in layer.initial:
            a, b = factor_keys(name, embedding=False)
            initial[a], initial[b] = layer.initial[adapter]
    if not initial:
        return config, tensors
    return variant_init.convert(config, tensors, initial)


def write_adapter(directory: str | Path, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter from a config and PEFT-keyed tensors (also for adapters made by algebra)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory; choose another output path")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # never an adapter full of NaN on disk, whoever computed it
        raise UserError(f"refusing to write {directory}: {bad[0]} holds NaN or Inf")
    save_tensors(directory / WEIGHTS_NAME, tensors)
    saved = LoraConfig.from_dict({**config.to_dict(), "inference_mode": True})
    saved.save(directory)
    return directory


# Dtypes an adapter's weights may have on disk: they are copied into float parameters.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FP32_MAX = torch.finfo(torch.float32).max


def read_adapter(directory: str | Path, inside: str | Path | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Config and PEFT-keyed tensors of an adapter directory, validated (no pickle, float dtypes, finite
    values, each module's A and B present with the rank its config says). With `inside`, both files
    read must lie under that directory (`lorakit.files.OutsideRoot` otherwise)."""
    directory = check_directory(directory, "adapter directory")
    weights = directory / WEIGHTS_NAME
    if not weights.exists() and not weights.is_symlink():
        if (directory / PICKLE_NAME).is_file():
            raise UserError(f"{directory} holds only {PICKLE_NAME} (a pickle, which lorakit never loads); "
                            "re-save it with PEFT's save_pretrained(safe_serialization=True)")
        raise UserError(f"{weights} not found; an adapter directory needs {WEIGHTS_NAME}")
    config = LoraConfig.load(directory, inside=inside)
    check_applies_to_base(config, directory)
    tensors = parse_tensors(read_bytes(weights, "safetensors file", inside=inside), weights)
    check_adapter_tensors(config, tensors, weights)
    return config, tensors


def check_applies_to_base(config: LoraConfig, source: str | Path) -> None:
    """Refuse an adapter saved against base weights its initialisation rewrote (PiSSA, OLoRA, CorDA unconverted;
    LoftQ): it does not apply to the base a user has."""
    if config.init_lora_weights == "loftq":
        raise UserError(f"{source} is a LoftQ adapter: it applies to the base as LoftQ quantizes it, which PEFT "
                        "rebuilds when loading it and lorakit does not implement; load it with PEFT")
    if config.changes_base():
        raise UserError(f"{source} was saved with init_lora_weights={config.init_lora_weights!r} without PEFT's "
                        "conversion, so it applies to base weights that this initialisation rewrote (PEFT rebuilds them "
                        "when loading it); re-save it converted (PEFT: save_pretrained(..., "
                        "path_initial_model_for_weight_conversion=...); lorakit train converts on its own)")


def parse_tensors(data: bytes, where: str | Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
        raise UserError(f"{where} is not a readable safetensors file ({str(err)[:200]}); re-save or re-download it") from None


def check_adapter_tensors(config: LoraConfig, tensors: dict[str, torch.Tensor], weights: str | Path) -> None:
    """What a file can be checked for without a model: float dtypes, finite values, and LoRA factor pairs
    whose shapes agree with each other and with the rank the config gives that module."""
    for key, t in tensors.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise UserError(f"{weights}: tensor {key} is {str(t.dtype).removeprefix('torch.')}; adapter weights must "
                            "be float32, float16, bfloat16 or float64")
    floats = [t for t in tensors.values() if t.numel()]
    # One fused call for all tensors (isfinite per tensor is ~10x slower here): a NaN or Inf anywhere makes
    # that tensor's norm non-finite. A huge but finite tensor can overflow its norm too; the exact check
    # below then clears it.
    if floats and not torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(floats)])).all():
        bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
        if bad:
            raise UserError(f"{weights}: tensor {bad[0]} contains NaN or Inf; the adapter is corrupt")
        big = [k for k, t in tensors.items() if t.dtype == torch.float64 and t.abs().max() > _FP32_MAX]
        if big:
            raise UserError(f"{weights}: tensor {big[0]} has values beyond float32's range (not finite once "
                            "loaded); the adapter is corrupt")
    pairs = 0
    for key, A in tensors.items():
        for a_suffix, b_suffix in FACTOR_SUFFIXES.items():
            if not key.endswith(a_suffix):
                continue
            module = key.removeprefix(PREFIX)[: -len(a_suffix)]
            B = tensors.get(key[: -len(a_suffix)] + b_suffix)
            if B is None:
                raise UserError(f"{weights}: module {module!r} has {a_suffix[1:]} but lacks {b_suffix[1:]}; "
                                "the adapter is incomplete")
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise UserError(f"{weights}: module {module!r} has {a_suffix[1:]} of shape {tuple(A.shape)} and "
                                f"{b_suffix[1:]} of shape {tuple(B.shape)}; they must be (r, in) and (out, r)")
            if A.shape[0] != config.rank_for(module):
                raise UserError(f"{weights}: module {module!r} has rank {A.shape[0]} but {CONFIG_NAME} says "
                                f"r={config.rank_for(module)} for it; the files do not belong together")
            for flag, suffix in (("use_dora", MAGNITUDE), ("lora_bias", LORA_BIAS)):
                extra = tensors.get(f"{PREFIX}{module}{suffix}")
                if getattr(config, flag) and (extra is None or tuple(extra.shape) != (B.shape[0],)):
                    raise UserError(f"{weights}: module {module!r} lacks a {suffix[1:]} of shape ({B.shape[0]},) "
                                    f"that {flag}=true implies; the adapter is incomplete")
            pairs += 1
    _check_token_tensors(config, tensors, weights)
    a_of = {b: a for a, b in FACTOR_SUFFIXES.items()}
    orphans = [k for k in tensors for b in a_of if k.endswith(b) and k[: -len(b)] + a_of[b] not in tensors]
    if orphans:
        raise UserError(f"{weights} lacks the lora_A beside {orphans[0]}; the adapter is incomplete")
    if not pairs:
        raise UserError(f"{weights} holds no LoRA weights (no lora_A / lora_B tensors); the adapter is empty")


def _check_token_tensors(config: LoraConfig, tensors: dict[str, torch.Tensor], weights: str | Path) -> None:
    """Token rows without a model: present exactly when trainable_token_indices is set, (ids, dim) each."""
    wanted = config.trainable_token_indices
    rows = {key.removeprefix(PREFIX)[: -len(TOKEN_ROWS)]: t for key, t in tensors.items() if key.endswith(TOKEN_ROWS)}
    if wanted is None and rows:
        raise UserError(f"{weights} holds token rows for {next(iter(rows))!r} but its config's "
                        "trainable_token_indices is not set; the files do not belong together")
    if wanted is not None and not rows:
        raise UserError(f"{weights} lacks the token rows (*{TOKEN_ROWS}) that its config's trainable_token_indices "
                        "implies; the adapter is incomplete")
    for module, t in rows.items():
        ids = wanted if isinstance(wanted, list) else \
            next((v for k, v in wanted.items() if matches([k], module)), None)
        if t.dim() != 2 or ids is not None and t.shape[0] != len(ids):
            raise UserError(f"{weights}: module {module!r} has token rows of shape {tuple(t.shape)}; "
                            f"trainable_token_indices needs ({len(ids or [])}, width)")


def load_adapter(model: nn.Module, directory: str | Path, adapter: str | None = None,
                 trainable: bool = False) -> str:
    """Add the adapter saved in `directory` (by lorakit or PEFT) to `model` and make it the active one.

    Works on a plain model (injects first). `trainable=True` leaves its weights trainable (to
    continue training it). Returns the adapter's name. On any mismatch the model is left unchanged.
    """
    config, tensors = read_adapter(directory)
    return install_adapter(model, config, tensors, adapter or "default", source=directory, trainable=trainable)


def install_adapter(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], adapter: str,
                    source: str | Path = "adapter", trainable: bool = False) -> str:
    """Add an adapter already read by `read_adapter` (the file I/O can happen elsewhere, e.g. off a
    server's inference thread); the model is left unchanged if it does not fit.

    Every LoRA factor the config implies is checked against the file, by name and shape, before
    anything is allocated: the file's sizes, not the config's `r`, bound what a load may allocate.
    """
    check_applies_to_base(config, source)
    plan = plan_injection(model, config)  # one walk of the model for the checks and the injection
    _check_fits(plan, config, tensors, Path(source))
    with transaction(model):
        inject(model, config, adapter=adapter, initialize=False, plan=plan)
        params = _copy_into(model, adapter, config, tensors, source=Path(source))
        if not trainable:
            for p in params.values():
                p.requires_grad_(False)
    return adapter


def _check_fits(plan: Plan, config: LoraConfig, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Each target's A (r, in) and B (out, r) must be in the file with the base's in and out, and each token
    layer's rows (k, dim) (no allocation)."""
    for name, module in plan.layers():
        inputs, outputs = layer_dims(module)
        r = config.rank_for(name)
        wanted = dict(zip(factor_keys(name, base_kind(module) == "embedding"), ((r, inputs), (outputs, r))))
        for flag, suffix in (("use_dora", MAGNITUDE), ("lora_bias", LORA_BIAS)):
            if getattr(config, flag):
                wanted[f"{PREFIX}{name}{suffix}"] = (outputs,)
        for key, shape in wanted.items():
            if key not in tensors:
                flags = [f for f in ("use_dora", "lora_bias") if getattr(config, f)]
                why = f" ({', '.join(f + '=true' for f in flags)})" if flags else ""
                raise UserError(f"{source}: {WEIGHTS_NAME} lacks {key} that its config implies{why}; "
                                "the adapter is incomplete (or made for a different base)")
            if tuple(tensors[key].shape) != shape:
                raise UserError(f"{source}: module {name!r} does not fit: {key.rsplit(name + '.', 1)[-1]} is "
                                f"{tuple(tensors[key].shape)} in the adapter but this base needs {shape}; is it the "
                                "adapter for a different base?")
    _check_token_rows(plan, tensors, source)


def _check_token_rows(plan: Plan, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Each module trainable_token_indices names needs its rows in the file: (number of ids, the base's width)."""
    bases = dict(plan.modules)
    for name, ids, shared in plan.tokens:
        key = f"{PREFIX}{name}{TOKEN_ROWS}"
        if shared:  # a tied head takes the embedding's rows (PEFT saves them once)
            continue
        if key not in tensors:
            raise UserError(f"{source}: {WEIGHTS_NAME} lacks {key}, the rows its config's trainable_token_indices "
                            "implies; the adapter is incomplete")
        shape = (len(ids), bases[name].weight.shape[1])  # the base layer, also where a TokenLayer wraps it
        if tuple(tensors[key].shape) != shape:
            raise UserError(f"{source}: module {name!r} does not fit: {TOKEN_ROWS[1:]} is "
                            f"{tuple(tensors[key].shape)} in the adapter but {len(ids)} token ids on this base need {shape}; is it the adapter "
                            "for a different base, or its trainable_token_indices edited?")


@torch.no_grad()
def _copy_into(model: nn.Module, adapter: str, config: LoraConfig, tensors: dict[str, torch.Tensor],
               source: Path) -> dict[str, nn.Parameter]:
    """Copy the file's tensors into the adapter's parameters (all of them, or an error); returns those."""
    targets = dict(_peft_params(model, adapter, config))
    extra = [k for k in tensors if k not in targets]
    for key in extra:
        if key.endswith(EMBEDDING_COPY):  # PEFT saves whole embedding matrices "in case they were resized"
            base = model.get_submodule(key[len(PREFIX):-len(EMBEDDING_COPY)]).base.weight
            if base.shape == tensors[key].shape and torch.equal(base.float(), tensors[key].float()):
                continue
            raise UserError(f"{source}: {key} replaces the base's embedding matrix (resized vocabulary?); "
                            "lorakit does not support that, load this adapter with PEFT")
        if key.endswith(TOKEN_ROWS):
            raise UserError(f"{source}: adapter has token rows for {_module_of(key)!r}, which its config's "
                            "trainable_token_indices does not name; the files do not belong together")
        raise UserError(f"{source}: adapter has weights for {_module_of(key)!r}, which this base model lacks; "
                        "is it the adapter for a different base?")
    missing = [k for k in targets if k not in tensors]
    if missing:
        raise UserError(f"{source}: {WEIGHTS_NAME} lacks {missing[0]} that its config implies; the adapter is incomplete")
    for key, param in targets.items():
        value = tensors[key]
        if value.shape != param.shape:
            module = _module_of(key)
            raise UserError(f"{source}: module {module!r} does not fit: {key[len(PREFIX) + len(module) + 1:]} is "
                            f"{tuple(value.shape)} in the adapter but this base needs {tuple(param.shape)}; "
                            "is it the adapter for a different base?")
        param.copy_(value)
    return targets


_SUFFIXES = (*FACTOR_SUFFIXES, *FACTOR_SUFFIXES.values(), MAGNITUDE, LORA_BIAS, ".base_layer.bias", EMBEDDING_COPY,
             TOKEN_ROWS, ".bias", ".weight")


def _module_of(key: str) -> str:
    """The module path inside a PEFT key: 'base_model.model.x.q_proj.lora_A.weight' -> 'x.q_proj'."""
    key = key.removeprefix(PREFIX)
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key.rsplit(".", 1)[0]


# -- adapters named on a command line -------------------------------------------------------------


def adapters_option(use: str, required: bool = False):
    """The repeatable `--adapter PATH[:SCALE]` flag of the commands that load adapters onto a base
    (`attach_adapters`); `use` ends the help: 'to mix several', 'to merge several', ..."""
    return option(f"adapter directory, optionally with a scale (default 1); repeat {use}", default_factory=list,
                  flag="--adapter", metavar="PATH[:SCALE]", required=required)


def parse_adapter_spec(spec: str) -> tuple[Path, float]:
    """'adapters/a:0.5' -> (Path('adapters/a'), 0.5); a bare path (or one that exists, colon and all) has scale 1."""
    path, sep, scale = spec.rpartition(":")
    if sep and not Path(spec).exists():
        try:
            value = float(scale)
        except ValueError:
            return Path(spec), 1.0
        if not math.isfinite(value):
            raise UserError(f"adapter {spec}: the scale must be a finite number, got {scale}")
        return Path(path), value
    return Path(spec), 1.0


def attach_adapters(model: nn.Module, specs: list[str]) -> dict[str, float]:
    """Load each 'PATH[:SCALE]' adapter onto `model` and activate them together at their scales."""
    weights: dict[str, float] = {}
    for spec in specs:
        path, scale = parse_adapter_spec(spec)
        name = path.name or "adapter"
        while name in weights:
            name += "_"
        load_adapter(model, path, adapter=name)
        weights[name] = scale
    if weights:
        set_adapters(model, weights)
    return weights
