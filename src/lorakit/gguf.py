"""`lorakit gguf`: adapters, bases and merged models as GGUF files for llama.cpp and Ollama.

    lorakit gguf --adapter adapters/legal --out legal.gguf                  # a llama.cpp LoRA adapter
    lorakit gguf --base models/base --out base.gguf --type q8_0             # the base (tokenizer included)
    lorakit gguf --base models/base --adapter adapters/legal:0.7 --out merged.gguf   # merged

Files are written with the `gguf` package that llama.cpp publishes, and tensor by tensor: the base is
read one tensor at a time straight from its safetensors files (no memory map), changed (merged in fp32,
renamed, transposed, rows reordered for llama.cpp's rope, see gguf_arch.py), encoded and written, so
the peak memory is about one tensor plus its encoded copy, whatever the model's size. The file appears
all at once: it is written beside --out and renamed into place.

llama.cpp scales an adapter by user_scale · alpha / r, with r read from each lora_b's shape; lorakit's
per-module scale (alpha/r, alpha/√r with rsLoRA, alpha_pattern, rank_pattern) is matched by writing
one `adapter.lora.alpha` and folding any remaining per-module factor into that module's B.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lorakit.errors import UserError
from lorakit.gguf_arch import Arch, arch_for, is_conv1d, kept_in_f32, permute_rows, rows_fit_q8_0
from lorakit.options import add_options, option, options
from lorakit.tensorfiles import Stored, stored_tensors

TYPES = ("f32", "f16", "bf16", "q8_0")
EMBEDDED = "lorakit/embedded"


@dataclass
class GgufConfig:
    """What `lorakit gguf` takes; each field's help is the CLI's --help."""

    out: Path = option("the .gguf file to write")
    base: str | None = option("base model directory (or lorakit/embedded). Alone: write the base; with "
                              "--adapter: write the base with the adapters merged in", default=None)
    adapters: list[str] = option("adapter directory and scale, PATH[:SCALE]; alone: write it as a llama.cpp "
                                 "adapter (a scale other than 1 is baked in); with --base: merge, repeatable",
                                 default_factory=list)
    type: str | None = option("tensor type: f32, f16, bf16 or q8_0 (default: the base's own dtype; f32 for "
                              "an adapter). Vectors and norms stay f32, as llama.cpp wants", default=None)
    adapter_base: str | None = option("for an adapter file: the base directory whose config.json names its "
                                      "tensors (default: the adapter's base_model_name_or_path)", default=None)
    overwrite: bool = option("replace an existing --out file", default=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.type is not None and self.type not in TYPES:
            raise UserError(f"--type {self.type!r} is not one of {', '.join(TYPES)}")
        if self.out.is_dir():
            raise UserError(f"--out {self.out} is a directory; give a file name such as {self.out / 'model.gguf'}")
        if self.out.exists() and not self.overwrite:
            raise UserError(f"{self.out} already exists; pass --overwrite to replace it or choose another --out")
        if self.base is None and len(self.adapters) > 1:
            raise UserError("a llama.cpp adapter file holds one adapter; give --base to merge several, or "
                            "combine them first with `lorakit combine`")
        if self.base is not None and self.adapter_base is not None:
            raise UserError("--adapter-base is for an adapter file; with --base the adapters are merged into it")


# -- encoding one tensor ----------------------------------------------------------------------------


def _ggml(type_name: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[type_name]


def tensor_type(name: str, shape: tuple[int, ...], file_type: str) -> str:
    """The type one tensor gets in a file of `file_type` (llama.cpp's converter's rules)."""
    if kept_in_f32(name, len(shape)):
        return "f32"
    if file_type == "q8_0" and not rows_fit_q8_0(shape):
        return "f16"
    return file_type


def nbytes(shape: tuple[int, ...], type_name: str) -> int:
    n = math.prod(shape)
    return {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n, "q8_0": n // 32 * 34}[type_name]


def encode(t: torch.Tensor, type_name: str) -> np.ndarray:
    """fp32 tensor -> the bytes GGUF stores for `type_name` (bf16 rounds to nearest even, as ggml does)."""
    t = t.detach().float().contiguous()
    if type_name == "f32":
        return t.numpy()
    if type_name == "f16":
        return t.half().numpy()
    if type_name == "bf16":
        return t.bfloat16().view(torch.int16).numpy()
    from gguf import quants

    return quants.quantize(t.numpy(), _ggml("q8_0"))  # (rows, cols / 32 · 34) bytes, row groups at a time


# -- adapters as llama.cpp sees them ---------------------------------------------------------------


@dataclass
class Update:
    """One adapter's change to one GGUF tensor: ΔW = weight · scale · B·A."""

    A: torch.Tensor  # (r, in); for an embedding (r, vocab)
    B: torch.Tensor  # (out, r); for an embedding (dim, r)
    scale: float  # the adapter's own α/r (or α/√r)
    weight: float  # the user's PATH:SCALE
    embedding: bool

    def add_to(self, w: torch.Tensor, transposed: bool) -> None:
        """w += weight·scale·B·A in place, in fp32 (one GEMM, no ΔW-sized temporary). `transposed`: w is
        stored (in, out), as GPT-2's Conv1D weights; an embedding's (vocab, dim) is that layout too."""
        B, A, s = self.B.float(), self.A.float(), self.scale * self.weight  # (out, r), (r, in)
        if transposed or self.embedding:
            w.addmm_(A.t(), B.t(), alpha=s)  # (in, r) @ (r, out)
        else:
            w.addmm_(B, A, alpha=s)  # (out, r) @ (r, in)


def read_updates(specs: list[str], arch: Arch, config: dict[str, Any], base: dict[str, Stored] | None,
                 merging: bool) -> dict[str, list[Update]]:
    """GGUF module -> its updates, for each 'PATH[:SCALE]'; refuses what llama.cpp cannot carry."""
    from lorakit.algebra import Adapter
    from lorakit.io import parse_adapter_spec

    out: dict[str, list[Update]] = {}
    for spec in specs:
        path, weight = parse_adapter_spec(spec)
        if not math.isfinite(weight):
            raise UserError(f"adapter scale in {spec!r} must be a finite number")
        adapter = Adapter.load(path)
        adapter.require_plain("llama.cpp's LoRA adapters carry only A and B; merge it into the base first "
                              "(lorakit merge --adapter ... --out merged), then export that (lorakit gguf --base merged)")
        if adapter.config.modules_to_save:
            raise UserError(f"{path}: modules_to_save ({', '.join(adapter.config.modules_to_save)}) are whole "
                            "trained modules, not LoRA; the GGUF export does not carry them")
        if adapter.extras():
            raise UserError(f"{path}: {next(iter(adapter.extras()))} is not a LoRA factor (trained biases, "
                            "saved modules or token rows); the GGUF export carries LoRA factors only")
        for module, f in adapter.modules().items():
            name = arch.gguf_module(module)
            if name is None or name == "position_embd":
                raise UserError(f"{path}: module {module!r} has no LoRA counterpart in llama.cpp's {arch.name}")
            if not merging and arch.tied(config) and name in ("token_embd", "output"):
                raise UserError(f"{path}: adapts {module!r}, but this base ties its embeddings to its output "
                                "layer, which llama.cpp then shares as one tensor; merge it instead (--base)")
            _check_shape(path, module, name, f, arch, base)
            out.setdefault(name, []).append(Update(f.A, f.B, f.scale, weight, f.embedding))
    return out


def _check_shape(path: Path, module: str, name: str, f, arch: Arch, base: dict[str, Stored] | None) -> None:
    """The factors must fit the base's weight (rows, columns as llama.cpp stores them)."""
    if base is None:
        return

    def weight_of(gguf_name: str) -> Stored | None:
        return next((t for n, t in base.items() if n.endswith(".weight")
                     and arch.gguf_module(n.removesuffix(".weight")) == gguf_name), None)

    stored = weight_of(name) or (weight_of("token_embd") if name == "output" else None)  # a tied head
    if stored is None:
        raise UserError(f"{path}: module {module!r} is not in the base; is this adapter for another model?")
    rows, cols = stored.shape[::-1] if is_conv1d(arch, name) else stored.shape
    want = (f.A.shape[1], f.B.shape[0]) if f.embedding else (f.B.shape[0], f.A.shape[1])
    if (rows, cols) != want:
        raise UserError(f"{path}: module {module!r} has shape {want} in the adapter but {(rows, cols)} in the "
                        "base; is this adapter for another model?")


# -- what goes into the file ------------------------------------------------------------------------


@dataclass
class Item:
    name: str
    shape: tuple[int, ...]
    type: str
    produce: Callable[[], torch.Tensor]
    """The fp32 tensor, made when it is written (so only one exists at a time)."""


@dataclass
class Plan:
    arch: Arch
    kind: str  # "model" or "adapter"
    metadata: dict[str, Any]  # GGUFWriter add_* method name -> value
    items: list[Item] = field(default_factory=list)
    vocab: Any = None
    alpha: float | None = None


def _block_order(name: str) -> tuple:
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "blk" else (-1 if name.startswith("token") else 1 << 30, name)


def base_plan(directory: Path, config: dict[str, Any], arch: Arch, type_name: str,
              updates: dict[str, list[Update]]) -> list[Item]:
    """Every base tensor as a GGUF item, with `updates` merged in as each one is produced."""
    from lorakit import nf4

    tensors = stored_tensors(directory)
    quantized = {n.removesuffix(f".{nf4.QUANT_STATE}") for n in tensors if n.endswith(f".{nf4.QUANT_STATE}")}
    heads = arch.rope_heads(config) if arch.rope_heads else {}
    items = []
    for key in tensors:
        if arch.skipped(key) or any(key.startswith(q + ".") for q in quantized):
            continue  # buffers llama.cpp rebuilds; NF4 constants (read with their weight)
        module, _, suffix = key.rpartition(".")
        name = arch.gguf_module(module)
        if name is None:
            raise UserError(f"{directory}: tensor {key} has no place in llama.cpp's {arch.name}; "
                            "the GGUF export cannot write this model")
        if key in quantized:
            read = _nf4_reader(tensors, key)
            shape = tuple(json.loads(bytes(tensors[f"{key}.{nf4.QUANT_STATE}"].read().tolist()))["shape"])
        else:
            read, shape = tensors[key].read, tensors[key].shape
        conv = is_conv1d(arch, name) and suffix == "weight"
        shape = shape[::-1] if conv else shape
        mine = updates.get(name, []) if suffix == "weight" else []
        items.append(Item(f"{name}.{suffix}", shape, tensor_type(f"{name}.{suffix}", shape, type_name),
                          _producer(read, conv, mine, heads.get(name))))
    if arch.tied(config) and not any(i.name == "output.weight" for i in items) and (
            updates.get("token_embd") or updates.get("output")):
        # llama.cpp would share token_embd as the output layer; once either is changed they differ
        embed = next(i for i in items if i.name == "token_embd.weight")
        key = next(k for k in tensors if arch.gguf_module(k.rpartition(".")[0]) == "token_embd")
        items.append(Item("output.weight", embed.shape, embed.type,
                          _producer(tensors[key].read, False, updates.get("output", []), None)))
    return sorted(items, key=lambda i: _block_order(i.name))


def _producer(read: Callable[[], torch.Tensor], conv: bool, updates: list[Update], heads: int | None):
    def produce() -> torch.Tensor:
        w = read().float()  # a buffer of its own (read, or cast from bf16/f16): merged into in place
        for u in updates:  # W + Σ weight·scale·B·A, in fp32
            u.add_to(w, transposed=conv)
        w = w.t() if conv else w  # Conv1D (in, out) -> (out, in)
        return permute_rows(w, heads) if heads else w

    return produce


def _nf4_reader(tensors: dict[str, Stored], key: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        from lorakit import nf4

        parts = {n: t.read() for n, t in tensors.items() if n == key or n.startswith(key + ".")}
        return nf4.from_bnb(parts, key, torch.float32).dequantize(torch.float32)

    return read


def adapter_plan(updates: dict[str, list[Update]], config: dict[str, Any], arch: Arch,
                 type_name: str) -> tuple[list[Item], float]:
    """lora_a / lora_b items and the file's alpha, chosen so llama.cpp's α/r equals our scale per module."""
    # α/r · r is the adapter's own alpha (α·√r under rsLoRA); the most common one keeps most B's as they are
    alpha = Counter(u.scale * u.B.shape[1] for (u,) in updates.values()).most_common(1)[0][0]
    heads = arch.rope_heads(config) if arch.rope_heads else {}
    items = []
    for name, (u,) in sorted(updates.items(), key=lambda kv: _block_order(kv[0])):
        factor = u.weight * u.scale * u.B.shape[1] / alpha  # 1.0 unless patterns or a baked-in scale differ
        a = u.A.t() if u.embedding else u.A  # llama.cpp looks an embedding's A up by token: (vocab, r)
        b = u.B if factor == 1.0 else u.B.float() * factor
        b = permute_rows(b.float(), heads[name]) if name in heads else b
        for suffix, t in (("lora_a", a), ("lora_b", b)):
            full = f"{name}.weight.{suffix}"
            items.append(Item(full, tuple(t.shape), tensor_type(full, tuple(t.shape), type_name),
                              lambda t=t: t.float()))
    return items, alpha


# -- writing ----------------------------------------------------------------------------------------


def write_plan(plan: Plan, out: Path, file_type: str, label: str) -> int:
    """Write `plan` to `out` atomically, one tensor in memory at a time; returns the file's size."""
    import gguf

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise UserError(f"cannot write to {out.parent} ({err.strerror}); choose a writable --out") from None
    try:
        writer = gguf.GGUFWriter(tmp, plan.arch.name)
        writer.add_type(plan.kind)
        writer.add_name(label)
        writer.add_file_type(_file_type(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if plan.alpha is not None:
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
        for key, value in plan.metadata.items():
            getattr(writer, f"add_{key}")(value)
        if plan.vocab is not None:
            plan.vocab.write(writer)
        for item in plan.items:
            writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), nbytes(item.shape, item.type),
                                   raw_dtype=_ggml(item.type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan.items:
            t = item.produce()
            if tuple(t.shape) != item.shape:
                raise UserError(f"tensor {item.name} has shape {tuple(t.shape)}, its header says {item.shape}; "
                                "the model files disagree with each other")
            if not _finite(t):
                raise UserError(f"tensor {item.name} holds NaN or Inf; the model or adapter is corrupt")
            writer.write_tensor_data(encode(t, item.type))
        writer.fout[0].flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out.stat().st_size


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf; in slices, since isfinite on a whole tensor makes temporaries of twice its size."""
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(1 << 20))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_type(type_name: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[type_name]


# -- the command ------------------------------------------------------------------------------------


def _model_dir(base: str | None, what: str) -> Path:
    from lorakit.base import EMBEDDED_BASE

    if base is None or base == EMBEDDED:
        return EMBEDDED_BASE
    directory = Path(base).expanduser()
    if not (directory / "config.json").is_file():
        raise UserError(f"{what} {base} is not a model directory with a config.json (the GGUF export reads "
                        "local directories; download a hub model first)")
    return directory


def _config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{directory / 'config.json'} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{directory / 'config.json'} is not a JSON object")
    return config


def _base_type(directory: Path, config: dict[str, Any], tensors: dict[str, Stored]) -> str:
    """The file type a base is written in without --type: its own dtype; NF4 has none in GGUF."""
    from lorakit import nf4

    if nf4.is_quantized(directory):
        raise UserError(f"{directory} is an NF4 base, which has no GGUF type; pass --type f16, bf16, q8_0 or "
                        "f32 to write it dequantized")
    dtypes = {t.dtype for t in tensors.values() if len(t.shape) == 2}
    return {"F32": "f32", "F16": "f16", "BF16": "bf16"}.get(dtypes.pop() if len(dtypes) == 1 else "F32", "f32")


def export_gguf(config: GgufConfig) -> tuple[Path, str]:
    """Write the file `config` asks for; returns (path, a one-line description)."""
    from lorakit.gguf_vocab import read_vocab

    if config.base is None and config.adapters:  # an adapter file
        from lorakit.config import LoraConfig
        from lorakit.io import parse_adapter_spec

        path, weight = parse_adapter_spec(config.adapters[0])
        target = config.adapter_base or LoraConfig.load(path).base_model_name_or_path
        if target is None:
            raise UserError(f"{path} does not record its base (base_model_name_or_path); pass --adapter-base DIR, "
                            "the base model directory whose config.json names the tensors")
        directory = _model_dir(target, "the adapter's base")
        base_config = _config(directory)
        arch = arch_for(base_config, str(directory))
        base = stored_tensors(directory) if any(directory.glob("*.safetensors")) else None
        updates = read_updates(config.adapters, arch, base_config, base, merging=False)
        if not updates:
            raise UserError(f"{path} has no LoRA factors to write")
        type_name = config.type or "f32"
        items, alpha = adapter_plan(updates, base_config, arch, type_name)
        plan = Plan(arch, "adapter", {}, items, alpha=alpha)
        size = write_plan(plan, config.out, type_name, path.name)
        baked = f" at scale {weight:g}" if weight != 1.0 else ""
        return config.out, (f"llama.cpp LoRA adapter for {arch.name}{baked}, {len(updates)} modules, alpha "
                            f"{alpha:g}, {type_name}, {size / 1e6:.1f} MB")

    directory = _model_dir(config.base, "--base")
    base_config = _config(directory)
    arch = arch_for(base_config, str(directory))
    tensors = stored_tensors(directory)
    type_name = config.type or _base_type(directory, base_config, tensors)
    updates = read_updates(config.adapters, arch, base_config, tensors, merging=True)
    vocab = read_vocab(directory, int(base_config.get("vocab_size") or 0))
    plan = Plan(arch, "model", arch.hparams(base_config), base_plan(directory, base_config, arch, type_name, updates),
                vocab=vocab)
    label = (config.base or EMBEDDED).rstrip("/").rpartition("/")[2]
    size = write_plan(plan, config.out, type_name, label)
    merged = f" + {len(config.adapters)} adapter(s) merged" if config.adapters else ""
    return config.out, f"{arch.name} model{merged}, {len(plan.items)} tensors, {type_name}, {size / 1e6:.1f} MB"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gguf",
        help="write adapters, bases or merged models as GGUF files for llama.cpp and Ollama",
        description="Write a GGUF file for llama.cpp (and Ollama, LM Studio ...): a LoRA adapter, a base model "
        "with its tokenizer, or a base with adapters merged in. Llama, Qwen2 and GPT-2 architectures.\n\n"
        "examples:\n"
        "  lorakit gguf --adapter adapters/legal --out legal.gguf\n"
        "  lorakit gguf --base lorakit/embedded --out base.gguf --type q8_0\n"
        "  lorakit gguf --base models/base --adapter a:0.7 --adapter b:0.3 --out merged.gguf\n"
        "  llama-cli -m base.gguf --lora legal.gguf          # or --lora-scaled legal.gguf 0.5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="PATH[:SCALE]",
                   help=next(f for f in GgufConfig.__dataclass_fields__.values()
                             if f.name == "adapters").metadata["help"])
    add_options(p, GgufConfig, skip=("adapters",))

    def run(args) -> int:
        out, what = export_gguf(GgufConfig(adapters=args.adapters, **options(args, GgufConfig, skip=("adapters",))))
        print(f"wrote {out}: {what}")
        return 0

    p.set_defaults(func=run)
