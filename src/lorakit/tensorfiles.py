"""A model's safetensors weights on disk, read and written one tensor at a time (streaming load, merge, GGUF).

    stored = stored_tensors(Path("models/big"))      # name -> Stored, from the headers only
    w = stored["model.layers.0.mlp.up_proj.weight"].read()
    write_shards(out, [Planned(name, dtype, shape, produce), ...])   # model-0000i-of-0000n + index

The headers are parsed and checked up front (dtype, shape and byte range of every tensor must agree
with each other and with the file's size), so a broken file is refused before anything is written.
Reading uses plain file reads, not a memory map: every page of a mapped file that a read touches
counts in the process's resident memory until the file is closed (measured: reading a 1 GB file
through `safe_open` raised RSS by 1.07 GB), so streaming a 13 GB checkpoint through one `safe_open`
would end up holding all of it. Sharded checkpoints are found through `model.safetensors.index.json`.

Writing lays out each shard's header first (every name, dtype and shape is known up front), then
produces and writes one tensor at a time: the peak is one tensor, whatever the model's size. The
files follow transformers' names (`model.safetensors`, or `model-00001-of-00003.safetensors` plus
`model.safetensors.index.json`), so `from_pretrained` and other engines load them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3  # transformers' old default shard size; a shard is one file
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 ** 2  # safetensors' own limit on a header


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str
    """safetensors' name for the dtype: 'BF16', 'F32', 'U8', ..."""
    shape: tuple[int, ...]
    start: int
    """Byte offset of the data in the file."""
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def read(self) -> torch.Tensor:
        """The tensor, in its stored dtype, in memory of its own (not a map of the file)."""
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.torch_dtype)
        data = bytearray(self.nbytes)
        try:
            with open(self.file, "rb") as f:
                f.seek(self.start)
                complete = f.readinto(data) == len(data)
        except OSError as err:
            raise UserError(f"cannot read {self.file} ({err.strerror})") from None
        if not complete:
            raise UserError(f"{self.file} is truncated; re-download or re-save the model")
        return torch.frombuffer(data, dtype=self.torch_dtype).view(self.shape)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else every *.safetensors."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise UserError(f"{index} is not a valid safetensors index; re-save the model") from None
        files = sorted(directory / str(n) for n in names)
        for file in files:
            if file.parent != directory or not file.is_file():
                raise UserError(f"{index} names {file.name}, which is not in {directory}; the model is incomplete")
        return files
    return sorted(directory.glob("*.safetensors"))


def stored_tensors(directory: str | Path) -> dict[str, Stored]:
    """name -> Stored for every tensor of a model directory (sharded or not), from the headers alone."""
    directory = Path(directory)
    files = weight_files(directory)
    if not files:
        raise UserError(f"{directory} holds no .safetensors weights (lorakit never loads pickled .bin "
                        "weights); re-save the model with save_pretrained(safe_serialization=True)")
    out: dict[str, Stored] = {}
    for file in files:
        for name, stored in read_header(file).items():
            if name in out:
                raise UserError(f"{name} is stored twice ({out[name].file.name} and {file.name}); "
                                f"the weights in {directory} are inconsistent")
            out[name] = stored
    return out


def read_header(file: Path) -> dict[str, Stored]:
    """name -> Stored for one safetensors file, every entry checked against the file's size."""
    broken = UserError(f"{file} is not a valid safetensors file; re-download or re-save the model")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(_MAX_HEADER, size - 8):
                raise broken
            header = json.loads(f.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise broken from None
    if not isinstance(header, dict):
        raise broken
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            start, stop = int(start), int(stop)
        except (KeyError, TypeError, ValueError):
            raise broken from None
        if dtype not in DTYPES:
            raise UserError(f"{file}: tensor {name} has dtype {dtype}, which lorakit does not read")
        if min(shape, default=0) < 0 or not 0 <= start <= stop or base + stop > size or (
                stop - start != math.prod(shape) * DTYPES[dtype].itemsize):
            raise broken
        out[name] = Stored(file, dtype, shape, base + start, base + stop)
    return out


# -- writing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """A tensor to write: its name, dtype and shape now, its values from `produce()` when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_shards(directory: str | Path, plan: Iterable[Planned], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `plan` into `directory` as safetensors shards of at most `max_shard_bytes` (a bigger tensor
    gets a shard of its own), in order; with more than one shard also the index. Returns the files.

    Each tensor is produced, checked against its plan, written and dropped before the next one.
    """
    directory = Path(directory)
    plan = list(plan)
    shards: list[list[Planned]] = [[]]
    for item in plan:
        if shards[-1] and sum(p.nbytes for p in shards[-1]) + item.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(item)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    meta = {"format": "pt", **(metadata or {})}
    for name, shard in zip(names, shards):
        _write_file(directory / name, shard, meta)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in plan)},
                 "weight_map": {p.name: name for name, shard in zip(names, shards) for p in shard}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]


def _write_file(path: Path, items: list[Planned], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for p in items:
        header[p.name] = {"dtype": NAMES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for p in items:
            tensor = p.produce()
            if tuple(tensor.shape) != tuple(p.shape) or tensor.dtype != p.dtype:
                raise RuntimeError(f"{p.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                   f"planned {p.dtype} {tuple(p.shape)}")
            if p.nbytes:
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
