"""Merged export: a base model with adapters folded into its weights, as a plain transformers directory.

The result has no LoRA modules and no lorakit dependency: `AutoModelForCausalLM.from_pretrained`
loads it, and vLLM, TGI or llama.cpp's converters take it as they take any model. The directory
appears all at once: it is written beside `--out` and renamed into place.

The full-precision export streams: the base is never in memory. The model is built on the meta device
(`streaming.skeleton`) and the adapters are attached to it, which checks them against the base's names
and shapes as a real load would; then each weight is read from the checkpoint, its layers' updates
ΔW = w·s·B·A are added in fp32 (what `LoraLayer.merge` adds, in the same order), and it is rounded once
to the output dtype, written, and dropped before the next one (`tensorfiles.write_shards`). Peak memory:
one tensor in fp32 and its update, plus the adapters and the small parameters (norms, biases). The
files equal an in-memory merge bit for bit (tested). An NF4 base (from `lorakit quantize`) is
dequantized weight by weight, so the export is full precision.

With `stay_quantized` the adapters are merged into NF4 weights instead (dequantize, add, quantize
again) and the model is written in NF4; that last rounding is an error of its own, which is reported.
That model is built in memory, but in 4 bits: a full-precision base is quantized as it streams in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit import nf4
from lorakit.adapters import lora_layers, unload
from lorakit.base import DTYPES, EMBEDDED_BASE, base_option, base_source, load_base, local_directory
from lorakit.errors import UserError
from lorakit.files import check_output, staged_directory
from lorakit.io import EMBEDDING_COPY, PREFIX, adapters_option, attach_adapters, parse_adapter_spec, read_adapter
from lorakit.layers import LoraLayer, base_kind
from lorakit.modules import matches
from lorakit.options import add_command, default_of, option
from lorakit.streaming import Checkpoint, plain_config, skeleton
from lorakit.tensorfiles import DEFAULT_SHARD_BYTES, Planned, write_shards
from lorakit.variants import dora


def merge_export(adapters: list[str], out: str | Path, base: str | Path | None = None, dtype: str = "fp32",
                 overwrite: bool = False, stay_quantized: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `base` + Σ scale·adapter, merged, to `out` (safetensors, config, tokenizer).

    `adapters` are 'PATH[:SCALE]' specs; `base` None is the embedded base. Returns `out`. The weights
    stream through tensor by tensor into safetensors shards of at most `max_shard_bytes`. With
    `stay_quantized` the weights are written in NF4 (the base is quantized first if it is not) and the
    error re-quantizing added is printed, as ‖NF4(W + ΔW) − (W + ΔW)‖ / ‖ΔW‖ over the merged layers.
    """
    from transformers.utils import logging as hf_logging

    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if not adapters:
        raise UserError("nothing to merge: give at least one adapter, e.g. --adapter adapters/legal")
    check_out(out, overwrite)
    source = base_source(base)
    tokenizer = fresh_tokenizer(base)  # the base's own files (load_base may set a pad token)

    hf_logging.disable_progress_bar()  # a bar for writing one shard is noise
    try:
        if stay_quantized:
            model = _merged_nf4(adapters, base, DTYPES[dtype])
            with staged_directory(out) as staging:
                nf4.save_quantized(model, staging)
                tokenizer.save_pretrained(staging)
        else:
            directory = local_directory(source)
            with staged_directory(out) as staging:
                merge_streaming(directory, adapters, staging, DTYPES[dtype], max_shard_bytes)
                tokenizer.save_pretrained(staging)
    finally:
        hf_logging.enable_progress_bar()
    return out


def merge_streaming(directory: Path, adapters: list[str], out: Path, dtype: torch.dtype,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write the model in `directory` with `adapters` merged into `out` (an existing, empty directory) as
    safetensors shards in `dtype` plus its config; the base is read one tensor at a time. Returns the files."""
    config = plain_config(directory)
    model = skeleton(config, torch.float32)  # names, shapes and ties; no weights
    checkpoint = Checkpoint(model, directory)
    # What attaching adapters writes into or compares with must be real: the small parameters (norms,
    # biases: `bias="all"` adapters replace them), modules_to_save (copied whole), and embeddings whose
    # full matrix an adapter carries (PEFT's copy, compared with the base's).
    checkpoint.materialize(model, _needed_whole(model, adapters))
    attach_adapters(model, adapters)
    layers = {f"{name}.weight": layer for name, layer in lora_layers(model)}
    # On the skeleton the merge itself is free (meta tensors); what it leaves is the plain model whose
    # SavedModules and adapter biases are in place, and each layer's record of what it merged.
    model = unload(model, merge=True)

    plan, seen = [], set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:  # a tied twin is stored once, as save_pretrained does
            continue
        seen.add(id(value))
        stored = value.device.type == "meta" or (not isinstance(value, torch.nn.Parameter) and checkpoint.holds(name))
        if value.device.type == "meta" and not checkpoint.holds(name):
            raise UserError(f"{directory}: the weights lack {name}; the model directory is incomplete")
        shape = checkpoint.shape(name) if stored else None
        if shape is not None and tuple(shape) != tuple(value.shape):
            raise UserError(f"{name} is {tuple(shape)} in the checkpoint but the model needs {tuple(value.shape)}; "
                            "is config.json the one these weights were saved with?")
        out_dtype = dtype if value.is_floating_point() else value.dtype
        produce = _reader(checkpoint, name, layers.get(name), out_dtype, tuple(value.shape)) if stored else (
            lambda value=value, out_dtype=out_dtype: value.detach().to(out_dtype))
        plan.append(Planned(name, out_dtype, tuple(value.shape), produce))
    files = write_shards(out, plan, max_shard_bytes)
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return files


def _needed_whole(model, adapters: list[str]) -> list[str]:
    """The skeleton's parameters that attaching `adapters` needs real: all but the weights of the layers
    LoRA wraps (Linear, Conv1D, Embedding), and those too for modules_to_save and copied embeddings."""
    whole = set()
    for spec in adapters:
        config, tensors = read_adapter(parse_adapter_spec(spec)[0])
        if config.trainable_token_indices:  # its rows would need the streamed writer to patch embedding rows
            raise UserError(f"{spec}: the streamed merge does not write trainable_token_indices rows yet; merge it "
                            "in memory instead (load_adapter, then unload(model, merge=True) and save_pretrained)")
        whole |= {n for n, _ in model.named_modules() if n and matches(config.modules_to_save or [], n)}
        whole |= {k[len(PREFIX):-len(EMBEDDING_COPY)] for k in tensors if k.endswith(EMBEDDING_COPY)}
    names = []
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            wrapped = leaf == "weight" and base_kind(module) is not None
            inside = any(module_name == w or module_name.startswith(w + ".") for w in whole)
            if not wrapped or inside:
                names.append(f"{module_name}.{leaf}" if module_name else leaf)
    return names


def _reader(checkpoint: Checkpoint, name: str, layer: LoraLayer | None, dtype: torch.dtype,
            shape: tuple[int, ...]):
    """How to produce `name` for the file: read it, add its layer's merged updates in fp32, round once."""

    def produce() -> torch.Tensor:
        tensor = checkpoint.read(name)
        if tuple(tensor.shape) != shape:  # an NF4 weight's shape is only known once its quant state is read
            raise UserError(f"{checkpoint.directory}: NF4 weight {name} of shape {tuple(tensor.shape)} does not fit "
                            f"the model's {shape}; the directory is corrupt")
        if layer is None or not layer.merged:
            return tensor.to(dtype)
        weight = tensor.float()  # (out, in); (in, out) for Conv1D and Embedding, as delta_weight lays it out
        W = weight if layer.kind == "linear" else weight.t()  # (out, in)
        unmerged = W.clone() if any(a in layer.lora_magnitude for a in layer.merged) else None
        for adapter, scale in layer.merged.items():  # LoraLayer.merge's maps, in its order, into an fp32 base
            is_dora = adapter in layer.lora_magnitude  # DoRA weighs the update itself (dora.merged_weight)
            delta = layer.delta_weight(adapter, 1.0 if is_dora else scale)  # (s·B·A)·w, as LoraLayer.merge rounds it
            delta = delta if layer.kind == "linear" else delta.t()  # (out, in)
            if is_dora:  # its norm from the unmerged W, as LoraLayer.merge
                n = dora.divisor(torch.linalg.vector_norm(unmerged + delta, dim=1))  # (out,)
                f = layer.lora_magnitude[adapter].detach().float() / n
                W = dora.merged_weight(W, delta, f, scale)
            else:
                W += delta
        return (W if layer.kind == "linear" else W.t()).to(dtype)

    return produce


def _merged_nf4(adapters: list[str], base: str | Path | None, dtype: torch.dtype):
    """The NF4 base (quantized as it streams in, if it is not NF4 already) with `adapters` merged into its 4-bit
    weights; the error the re-quantization added is printed."""
    source = base_source(base)
    spec = None if isinstance(source, Path) and nf4.is_quantized(source) else nf4.QuantizeSpec()
    model, _ = load_base(base, dtype=torch.float32, device=torch.device("cpu"), quantize=spec)
    attach_adapters(model, adapters)
    error = _merge_into_nf4(model)
    print(f"re-quantizing to NF4 moved the merged weights by {100 * error:.1f}% of the adapters' update "
          "(‖NF4(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖); merge without --stay-quantized for an exact "
          "full-precision model")
    model = unload(model, merge=True)
    return model.to(dtype)  # NF4 layers keep their bytes and take dtype as their compute dtype


def _merge_into_nf4(model) -> float:
    """Merge the active adapters into the NF4 layers; ‖NF4(W + ΔW) − (W + ΔW)‖ / ‖ΔW‖ summed over them."""
    error = update = 0.0
    for _, layer in lora_layers(model):
        if isinstance(layer.base, nf4.NF4Linear):
            exact = layer.folded_weight()[0]  # (out, in) fp32: what a full-precision merge would hold (DoRA too)
            delta = exact - layer.base.weight.float()
            layer.merge()
            error += float((layer.base.weight.float() - exact).square().sum())
            update += float(delta.square().sum())
    return (error / update) ** 0.5 if update else 0.0


def check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        check_output(out, "--out", directory=True)  # a parent that is a file, or unwritable: before any work
        return
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    # --overwrite deletes the old directory: only ever one that looks like a model (or is empty).
    if not out.is_dir() or not ((out / "config.json").is_file() or not any(out.iterdir())):
        raise UserError(f"{out} is not a model directory (no config.json); refusing to replace it, "
                        "choose another --out")


def fresh_tokenizer(base: str | Path | None):
    from transformers import AutoTokenizer

    source = EMBEDDED_BASE if base is None or str(base) == "lorakit/embedded" else Path(base).expanduser()
    try:
        return AutoTokenizer.from_pretrained(source if Path(source).exists() else str(base))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of {base} ({str(err).splitlines()[0]}); the base directory "
                        "needs its tokenizer files, which the written model ships") from None


@dataclass(kw_only=True)
class MergeConfig:
    """Everything `lorakit merge` takes; each field's help is its --help (defaults: `merge_export`'s)."""

    base: str | None = base_option()
    adapters: list[str] = adapters_option("to merge several", required=True)
    out: Path = option("model directory to write")
    dtype: str = option("weights dtype of the written model: fp32, bf16 or fp16", default=default_of(merge_export, "dtype"))
    overwrite: bool = option("replace an existing model directory at --out", default=False)
    stay_quantized: bool = option("write NF4 weights: merge into the 4-bit base and quantize again (lossy; the error is "
                                  "printed). Default: a full-precision model, also from an NF4 base", default=False)


def cmd_merge(config: MergeConfig) -> Path:
    """`lorakit merge`: `merge_export` and a line on what was written."""
    out = merge_export(config.adapters, config.out, base=config.base, dtype=config.dtype, overwrite=config.overwrite,
                       stay_quantized=config.stay_quantized)
    mixed = " + ".join(f"{scale:g}×{path}" for path, scale in map(parse_adapter_spec, config.adapters))
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out}: {config.base or 'the embedded base'} + {mixed}, merged, "
          f"{'nf4' if config.stay_quantized else config.dtype}, {size / 1e6:.1f} MB")
    return out


def register(subparsers) -> None:
    add_command(subparsers, "merge", "fold adapters into the base weights and write a plain transformers model",
                "Fold adapters (at their scales) into the base weights and write a complete transformers model "
                "directory: safetensors, config and tokenizer. No LoRA at inference time; AutoModelForCausalLM, "
                "vLLM or llama.cpp's converters load it like any model.\n\nexamples:\n"
                "  lorakit merge --adapter adapters/legal --out models/legal\n"
                "  lorakit merge --base models/base --adapter a:0.7 --adapter b:0.3 --out models/mix --dtype bf16\n"
                "  lorakit merge --base big-nf4 --adapter adapters/q --out merged-nf4 --stay-quantized",
                cmd_merge, MergeConfig)
