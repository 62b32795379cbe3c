"""The tensors of a safetensors model directory (sharded or not), read one at a time.

The headers are parsed and checked up front (dtype, shape and byte range of every tensor must agree
with each other and with the file's size), so a broken file is refused before anything is written.
Each tensor is then read with plain file reads into its own buffer: a memory map would keep every
page it touched resident, and a pass over a large model would end up holding all of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import UserError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    def read(self) -> torch.Tensor:
        """The tensor, in a buffer of its own."""
        data = bytearray(self.stop - self.start)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            if f.readinto(data) != len(data):
                raise UserError(f"{self.file} is truncated; re-download or re-save the model")
        return torch.frombuffer(data, dtype=DTYPES[self.dtype]).reshape(self.shape) if data else (
            torch.empty(self.shape, dtype=DTYPES[self.dtype]))


def stored_tensors(directory: Path) -> dict[str, Stored]:
    """name -> Stored for every tensor of a model directory (sharded or not), from the headers only."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{index} is not a valid safetensors index; re-save the model") from None
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory} holds no .safetensors weights (pickled .bin weights are never loaded); "
                        "re-save the model with safe_serialization=True")
    out: dict[str, Stored] = {}
    for file in files:
        out.update(_header(file))
    return out


def _header(file: Path) -> dict[str, Stored]:
    broken = UserError(f"{file} is not a valid safetensors file; re-download or re-save the model")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise broken
            header = json.loads(f.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise broken from None
    if not isinstance(header, dict):
        raise broken
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise broken from None
        width = DTYPES[dtype].itemsize if dtype in DTYPES else None
        if width is None or not 0 <= start <= stop or 8 + length + stop > size or (
                stop - start != math.prod(shape) * width):
            raise broken
        out[name] = Stored(file, dtype, shape, 8 + length + start, 8 + length + stop)
    return out
