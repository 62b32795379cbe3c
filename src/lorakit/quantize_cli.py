"""`lorakit quantize`: write a reusable NF4 copy of a base model (QLoRA's 4-bit base).

    lorakit quantize --base ~/models/big --out big-nf4
    lorakit train --base big-nf4 --data d.jsonl --out adapters/q

The copy is a transformers directory in bitsandbytes' 4-bit serialization: `lorakit train/generate/
merge --base` read it, and so does `AutoModelForCausalLM.from_pretrained` where bitsandbytes is
installed. Like `lorakit merge`, it is written beside --out and renamed into place.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from lorakit.base import load_base
from lorakit.errors import UserError
from lorakit.export import _check_out, _fresh_tokenizer, _replace_dir
from lorakit.nf4 import BaseMemory, base_memory, quantize, save_quantized


def quantize_base(out: str | Path, base: str | None = None, blocksize: int = 64, double_quant: bool = True,
                  include: list[str] | str | None = None, overwrite: bool = False) -> BaseMemory:
    """Quantize `base`'s Linear layers (all but the output head, or `include`) to NF4 and save it to `out`.

    Returns the memory of the quantized model.
    """
    out = Path(out)
    _check_out(out, overwrite)
    model, _ = load_base(base, dtype=torch.float32, device=torch.device("cpu"))
    before = base_memory(model)
    quantize(model, "nf4", blocksize=blocksize, double_quant=double_quant, include=include)
    memory = base_memory(model)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as err:
        raise UserError(f"cannot write to {out.parent} ({err.strerror}); choose a writable --out") from None
    try:
        save_quantized(model, staging)
        _fresh_tokenizer(base).save_pretrained(staging)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {out}: {memory.nf4_params:,} of {memory.params:,} parameters in NF4 at "
          f"{memory.nf4_bits_per_param:.3f} bits each (constants included); weights "
          f"{before.bytes / 1e6:.2f} MB -> {memory.bytes / 1e6:.2f} MB")
    return memory


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write an NF4 (4-bit) copy of a base model for QLoRA training",
        description="Quantize a base model's Linear layers to NF4 with double quantization (QLoRA; the "
        "bytes bitsandbytes writes) and save a transformers directory that --base accepts. Embeddings "
        "and norms stay in full precision, and so does the output head unless --include names it.\n\n"
        "examples:\n"
        "  lorakit quantize --base ~/models/big --out big-nf4\n"
        "  lorakit train --base big-nf4 --data d.jsonl --out adapters/q\n"
        "  lorakit quantize --out tiny-nf4 --include '.*_proj' --blocksize 128",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", default=None, help="base model directory or hub id (default: the embedded base)")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--blocksize", type=int, default=64, help="values per absmax block (default 64, as QLoRA)")
    p.add_argument("--no-double-quant", action="store_true",
                   help="keep the absmax constants in fp32 (4.5 bits per weight instead of 4.127)")
    p.add_argument("--include", default=None,
                   help="Linear layers to quantize: comma-separated names or a regex over full names "
                        "(default: every Linear layer but the output head)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at --out")
    p.set_defaults(func=lambda a: _exit0(quantize_base(a.out, a.base, a.blocksize, not a.no_double_quant,
                                                       _include(a.include), a.overwrite)))


def _include(text: str | None) -> list[str] | str | None:
    """'q_proj,v_proj' -> a list of names; anything else is a regex (as --targets in train)."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names if names and all(n.replace(".", "_").isidentifier() for n in names) else text


def _exit0(result: object) -> int:
    return 0
