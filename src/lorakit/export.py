"""Merged export: a base model with adapters folded into its weights, as a plain transformers directory.

The result has no LoRA modules and no lorakit dependency: `AutoModelForCausalLM.from_pretrained`
loads it, and vLLM, TGI or llama.cpp's converters take it as they take any model. Merging happens in
fp32 (one rounding to the output dtype at the end), and the directory appears all at once: it is
written beside `--out` and renamed into place.

An NF4 base (from `lorakit quantize`) is dequantized first, so the export is full precision. With
`stay_quantized` the adapters are merged into the NF4 weights instead (dequantize, add, quantize
again) and the model is written in NF4; that last rounding is an error of its own, which is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit import nf4
from lorakit.adapters import lora_layers, unload
from lorakit.base import DTYPES, EMBEDDED_BASE, base_option, load_base
from lorakit.errors import UserError
from lorakit.files import check_output, staged_directory
from lorakit.io import adapters_option, attach_adapters, parse_adapter_spec
from lorakit.options import add_command, default_of, option


def merge_export(adapters: list[str], out: str | Path, base: str | Path | None = None, dtype: str = "fp32",
                 overwrite: bool = False, stay_quantized: bool = False) -> Path:
    """Write `base` + Σ scale·adapter, merged, to `out` (safetensors, config, tokenizer).

    `adapters` are 'PATH[:SCALE]' specs; `base` None is the embedded base. Returns `out`. With
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

    model, _ = load_base(base, dtype=torch.float32, device=torch.device("cpu"))
    if stay_quantized:
        if not any(isinstance(m, nf4.NF4Linear) for m in model.modules()):
            nf4.quantize(model, "nf4")
        attach_adapters(model, adapters)
        error = _merge_into_nf4(model)
        print(f"re-quantizing to NF4 moved the merged weights by {100 * error:.1f}% of the adapters' update "
              "(‖NF4(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖); merge without --stay-quantized for an exact "
              "full-precision model")
    else:
        nf4.dequantize(model)  # an NF4 base becomes plain Linear layers: the merge is exact
        attach_adapters(model, adapters)
    model = unload(model, merge=True)
    model.to(DTYPES[dtype])  # NF4 layers keep their bytes and take dtype as their compute dtype
    tokenizer = fresh_tokenizer(base)  # load_base may have set a pad token; ship the base's own files

    hf_logging.disable_progress_bar()  # a bar for writing one shard is noise
    try:
        with staged_directory(out) as staging:
            if stay_quantized:
                nf4.save_quantized(model, staging)
            else:
                model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    finally:
        hf_logging.enable_progress_bar()
    return out


def _merge_into_nf4(model) -> float:
    """Merge the active adapters into the NF4 layers; ‖NF4(W + ΔW) − (W + ΔW)‖ / ‖ΔW‖ summed over them."""
    error = update = 0.0
    for _, layer in lora_layers(model):
        if isinstance(layer.base, nf4.NF4Linear):
            delta = sum(layer.delta_weight(n, w) for n, w in layer.active.items() if n in layer.lora_A)
            exact = layer.base.weight.float() + delta  # (out, in): what a full-precision merge would hold
            layer.merge()
            error += float((layer.base.weight.float() - exact).square().sum())
            update += float(torch.as_tensor(delta).square().sum())
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
    return AutoTokenizer.from_pretrained(source if Path(source).exists() else str(base))


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
