"""The running batch's key/value cache: per layer, (rows, heads, capacity, head_dim) buffers with room to grow.

Rows are left-padded to a shared length `length` (the attention mask says which columns are real), so a
decode step appends one column for every row at once. The buffers keep spare columns past `length`:
a step writes its keys and values into column `length` in place, where a `torch.cat` per layer and
step would copy the whole cache every time. Joining or dropping rows builds new buffers (rare: when
requests arrive or finish).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPARE = 64  # columns added past the need when the buffers grow: one copy per 64 decode steps


class BatchCache:
    """Keys and values of every layer for a batch of left-padded rows; columns [0, length) are in use."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int):
        self.layers = layers  # per layer (K, V), each (rows, heads, capacity, head_dim)
        self.length = length

    @classmethod
    def of(cls, cache) -> BatchCache:
        """Take over a transformers `DynamicCache` (after a forward that filled it), without copying."""
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return cls(layers, layers[0][0].shape[2])

    def dynamic(self):
        """The used columns as a transformers `DynamicCache` (views), for a forward through the model itself."""
        from transformers import DynamicCache

        n = self.length
        return DynamicCache([(K[:, :, :n], V[:, :, :n]) for K, V in self.layers])

    @property
    def capacity(self) -> int:
        return self.layers[0][0].shape[2]

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more columns past `length` (copying into bigger buffers if needed)."""
        need = self.length + columns
        if need <= self.capacity:
            return
        grown = []
        for K, V in self.layers:
            rows, heads, _, dim = K.shape
            K2, V2 = K.new_empty(rows, heads, need + SPARE, dim), V.new_empty(rows, heads, need + SPARE, dim)
            K2[:, :, :self.length], V2[:, :, :self.length] = K[:, :, :self.length], V[:, :, :self.length]
            grown.append((K2, V2))
        self.layers = grown

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's (rows, heads, T, head_dim) keys and values from column `length` on (after
        `reserve(T)`); return the layer's keys and values up to the last of them. `advance(T)` moves
        `length` once every layer wrote."""
        K, V = self.layers[layer]
        n, end = self.length, self.length + keys.shape[2]
        K[:, :, n:end] = keys
        V[:, :, n:end] = values
        return K[:, :, :end], V[:, :, :end]

    def advance(self, columns: int = 1) -> None:
        self.length += columns

    def select(self, index: torch.Tensor, start: int) -> BatchCache:
        """Rows `index`, from column `start` on (the columns before it are padding in all of them)."""
        n = self.length
        layers = [(K.index_select(0, index)[:, :, start:n], V.index_select(0, index)[:, :, start:n])
                  for K, V in self.layers]
        return BatchCache(layers, n - start)

    def join(self, other: BatchCache) -> BatchCache:
        """This batch's rows, then `other`'s, the shorter side left-padded with zeros to the longer."""
        width = max(self.length, other.length)
        layers = []
        for (K, V), (K2, V2) in zip(self.layers, other.layers):
            layers.append((torch.cat([left_pad(K[:, :, :self.length], width), left_pad(K2[:, :, :other.length], width)]),
                           torch.cat([left_pad(V[:, :, :self.length], width), left_pad(V2[:, :, :other.length], width)])))
        return BatchCache(layers, width)


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros in front along the sequence axis (dim 2 of a (B, H, L, D) cache tensor, dim 1 of a (B, L) mask)."""
    missing = width - t.shape[2 if t.dim() == 4 else 1]
    if missing == 0:
        return t
    return F.pad(t, (0, 0, missing, 0) if t.dim() == 4 else (missing, 0))
