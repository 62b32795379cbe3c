"""`lorakit quantize`: write a reusable NF4 copy of a base model (QLoRA's 4-bit base).

    lorakit quantize --base ~/models/big --out big-nf4
    lorakit train --base big-nf4 --data d.jsonl --out adapters/q

The copy is a transformers directory in bitsandbytes' 4-bit serialization: `lorakit train/generate/
merge --base` read it, and so does `AutoModelForCausalLM.from_pretrained` where bitsandbytes is
installed. Like `lorakit merge`, it is written beside --out and renamed into place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.base import base_option, load_base
from lorakit.export import check_out, fresh_tokenizer
from lorakit.files import staged_directory
from lorakit.modules import parse_names
from lorakit.options import add_command, default_of, option
from lorakit.nf4 import BaseMemory, QuantizeSpec, base_memory, save_quantized


def quantize_base(out: str | Path, base: str | None = None, blocksize: int = 64, double_quant: bool = True,
                  include: list[str] | str | None = None, overwrite: bool = False) -> BaseMemory:
    """Quantize `base`'s Linear layers (all but the output head, or `include`) to NF4 and save it to `out`.

    Returns the memory of the quantized model.
    """
    out = Path(out)
    check_out(out, overwrite)
    spec = QuantizeSpec(blocksize=blocksize, double_quant=double_quant, include=include)
    model, _ = load_base(base, dtype=torch.float32, device=torch.device("cpu"), quantize=spec)  # streamed
    memory = base_memory(model)
    before = memory.bytes - memory.nf4_bytes + 4 * memory.nf4_params  # the same weights in fp32
    with staged_directory(out) as staging:
        save_quantized(model, staging)
        fresh_tokenizer(base).save_pretrained(staging)
    print(f"wrote {out}: {memory.nf4_params:,} of {memory.params:,} parameters in NF4 at "
          f"{memory.nf4_bits_per_param:.3f} bits each (constants included); weights "
          f"{before / 1e6:.2f} MB -> {memory.bytes / 1e6:.2f} MB")
    return memory


@dataclass(kw_only=True)
class QuantizeConfig:
    """Everything `lorakit quantize` takes; each field's help is its --help (defaults: `quantize_base`'s)."""

    base: str | None = base_option()
    out: Path = option("model directory to write")
    blocksize: int = option("values per absmax block, as in QLoRA", default=default_of(quantize_base, "blocksize"))
    double_quant: bool = option("keep the absmax constants in fp32 (4.5 bits per weight instead of 4.127)",
                                default=default_of(quantize_base, "double_quant"))
    include: str | None = option("Linear layers to quantize: comma-separated names or a regex over full names "
                                 "(default: every Linear layer but the output head)", default=None)
    overwrite: bool = option("replace an existing model directory at --out", default=False)


def register(subparsers) -> None:
    add_command(subparsers, "quantize", "write an NF4 (4-bit) copy of a base model for QLoRA training",
                "Quantize a base model's Linear layers to NF4 with double quantization (QLoRA; the bytes "
                "bitsandbytes writes) and save a transformers directory that --base accepts. Embeddings and norms "
                "stay in full precision, and so does the output head unless --include names it.\n\nexamples:\n"
                "  lorakit quantize --base ~/models/big --out big-nf4\n"
                "  lorakit train --base big-nf4 --data d.jsonl --out adapters/q\n"
                "  lorakit quantize --out tiny-nf4 --include '.*_proj' --blocksize 128",
                _run, QuantizeConfig)


def _run(config: QuantizeConfig) -> BaseMemory:
    include = None if config.include is None else parse_names(config.include)
    return quantize_base(config.out, config.base, config.blocksize, config.double_quant, include, config.overwrite)
