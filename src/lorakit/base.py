"""Loading a base model (the embedded one by default), and the precision it runs in.

`--base` is a local transformers model directory or a hub id (for users who are online); without
it, the small Llama that ships inside the package is used. Precision: "auto" runs bf16 where the
hardware has fast bf16 matmuls (AMX / AVX-512 BF16 CPUs, CUDA GPUs with bf16), else fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from lorakit import nf4
from lorakit.errors import UserError
from lorakit.files import check_directory, read_json
from lorakit.options import option

EMBEDDED_BASE = Path(__file__).parent / "assets" / "base"
CORPORA = Path(__file__).parent / "assets" / "corpora"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_option():
    """The `--base` flag of every command that loads a base model (a config dataclass field)."""
    return option("base model directory or hub id (default: the embedded base)", default=None)


def dtype_option():
    """The `--dtype` flag of every command that runs a model: its compute precision (`resolve_dtype`)."""
    return option("compute precision: auto (bf16 where fast), bf16, fp16 or fp32", default="auto")


def quantize_option():
    """The `--quantize` flag of every command that loads a base to run it (`quantize_spec` reads it)."""
    return option("store the frozen base in 4 bits: nf4 (QLoRA: the base streams in and each Linear but the "
                  "output head is quantized as it arrives; adapters stay in full precision)", default=None)


def quantize_spec(name: str | None) -> nf4.QuantizeSpec | None:
    """What `load_base(quantize=...)` takes for a `--quantize` value: None (full precision) or NF4's spec.
    A config calls it in `__post_init__` too, so a bad value is refused before anything loads."""
    if name is None:
        return None
    if name != "nf4":
        raise UserError(f"--quantize {name!r} is not supported; use --quantize nf4 (or leave it out)")
    return nf4.QuantizeSpec(name)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CPU_BF16_ENV = "LORAKIT_CPU_BF16"


def cpu_has_fast_bf16() -> bool:
    """Whether `auto` picks bf16 on this CPU: the `LORAKIT_CPU_BF16` environment variable (0 or 1) if
    set, so one machine can run under either policy; else the hardware check (AMX-BF16 or AVX-512-BF16
    matmuls, about 4x faster than fp32; without them bf16 matmuls are 20-30x slower than fp32)."""
    setting = os.environ.get(CPU_BF16_ENV, "").strip()
    if setting:
        if setting not in ("0", "1"):
            raise UserError(f"{CPU_BF16_ENV}={setting!r} is not 0 or 1; set it to 1 (bf16 under auto), "
                            "0 (fp32 under auto), or unset it (the CPU decides)")
        return setting == "1"
    return cpu_flags_have_fast_bf16()


def cpu_flags_have_fast_bf16() -> bool:
    flags = cpu_info()[1]
    return "amx_bf16" in flags or "avx512_bf16" in flags


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's vendor ("AuthenticAMD", "GenuineIntel") and flags, from /proc/cpuinfo's first processor;
    ("", {}) where it cannot be read."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():  # the end of the first processor's block
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split())


@functools.cache
def onednn_bf16() -> bool:
    """Whether this torch's oneDNN runs bf16 products here (AVX-512 / AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 where bf16 matmuls are fast on this device, else fp32; or an explicit name.

    On a CPU, "fast" is `cpu_has_fast_bf16()`: measured, not assumed (BENCHMARKS.md); on CUDA,
    a GPU that supports bf16.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


DECODE_BF16_ELEMENTS = 1 << 20  # an MLP weight at least this big decodes faster in bf16 on such CPUs


def resolve_decode_dtype(name: str, device: torch.device, base: str | Path | None,
                         quantize: str | None = None) -> torch.dtype:
    """`resolve_dtype` for a command that decodes a few rows a step (`generate`, `serve`).

    Where `auto` picks bf16 by the CPU's flags (not by LORAKIT_CPU_BF16, which decides outright), a model
    whose MLP weight (from its config.json) has fewer than `DECODE_BF16_ELEMENTS` elements decodes in fp32:
    its products are so small that bf16's fixed cost per product (~20 us with oneDNN) outweighs its
    arithmetic. Measured on an AMX and a Zen 5 host (BENCHMARKS.md): the embedded base (256x704, 180K
    elements) decoded 0.79x and 0.89x as fast in bf16 and served 0.89x at 8 clients; the Qwen2-0.5B shape
    (896x4864, 4.4M) decoded 1.22x and served 1.95x. Decided by size, not timed at startup: a timing
    flipped between runs where the two were close, and the same command must give the same text. Hub
    ids, NF4 bases and GPUs keep `resolve_dtype`'s choice.
    """
    dtype = resolve_dtype(name, device)
    if name != "auto" or dtype != torch.bfloat16 or device.type != "cpu" or quantize is not None \
            or os.environ.get(CPU_BF16_ENV, "").strip():
        return dtype
    shapes = _linear_shapes(base)
    if shapes and max(o * i for o, i in shapes) < DECODE_BF16_ELEMENTS:
        return torch.float32
    return dtype


def _linear_shapes(base: str | Path | None) -> list[tuple[int, int]]:
    """A decoder layer's distinct Linear shapes (out, in) from a local base's config.json; [] if unknown."""
    source = base_source(base)
    if not isinstance(source, Path):
        return []
    config = read_json(source / "config.json", "model config")
    hidden = config.get("hidden_size") or config.get("n_embd")
    inner = config.get("intermediate_size") or config.get("n_inner") or (4 * hidden if isinstance(hidden, int) else 0)
    if not isinstance(hidden, int) or not isinstance(inner, int) or hidden <= 0 or inner <= 0:
        return []
    return [(hidden, hidden), (inner, hidden), (hidden, inner)]


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """A weight (out, in) in oneDNN's blocked layout for `onednn_linear` (an opaque tensor, the same bytes)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ (+ bias) through oneDNN, for a weight (out, in) as it is or packed (`onednn_pack`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for a low-precision compute dtype (fp32 adapter weights are cast per matmul)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def base_name(base: str | Path | None) -> str:
    """What to record as base_model_name_or_path: 'lorakit/embedded' for the shipped base."""
    return "lorakit/embedded" if base is None else str(base)


def load_base(base: str | Path | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | None = None, quantize: nf4.QuantizeSpec | None = None):
    """(model, tokenizer) for a causal LM: a directory, a hub id, or None for the embedded base.

    With `quantize` (QLoRA), or for a directory `lorakit quantize` wrote, the model streams in
    (`streaming.load_streaming`): built on the meta device and read tensor by tensor, each chosen Linear
    weight quantized to NF4 as it arrives, so the base never exists whole at full precision.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = base_source(base)
    device = device or default_device()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load reports and bars are noise for a CLI user
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if quantize is not None or nf4.is_quantized(source):
            from lorakit.streaming import load_streaming

            model = load_streaming(local_directory(source), dtype, device, quantize)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except UserError:
        raise
    except ValueError as err:
        raise UserError(f"{base} is not a causal language model ({_first_line(err)}); "
                        "--base needs a model AutoModelForCausalLM can load") from None
    except OSError as err:
        raise UserError(f"cannot load base model {base!r}: {_first_line(err)}") from None
    except (TypeError, KeyError, AttributeError, IndexError) as err:  # a config.json with odd values
        raise UserError(f"cannot load base model {base!r} ({type(err).__name__}: {_first_line(err)}); is its "
                        "config.json a transformers model config?") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def base_source(base: str | Path | None) -> str | Path:
    """The model directory (a Path) or hub id (a str) that `--base` names: None is the embedded base."""
    if base is None or str(base) == "lorakit/embedded":
        return EMBEDDED_BASE
    if Path(base).expanduser().exists():
        source = check_directory(Path(base).expanduser(), "base model directory")
        if not (source / "config.json").exists():
            raise UserError(f"{source} has no config.json; --base must be a transformers model directory")
        config = read_json(source / "config.json", "model config")
        if not isinstance(config, dict):
            raise UserError(f"{source / 'config.json'} holds a JSON {type(config).__name__}, not an object; "
                            "--base must be a transformers model directory")
        return source
    if str(base).startswith((".", "/", "~")):
        raise UserError(f"base model directory {base} not found; pass an existing directory or a hub id")
    return str(base)


def local_directory(source: str | Path) -> Path:
    """A local model directory for `source`; a hub id is downloaded (config, safetensors, tokenizer) first."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except OSError as err:  # the hub's errors (offline, not found, gated) are OSErrors
        raise UserError(f"cannot load base model {str(source)!r}: {str(err).splitlines()[0]}") from None
