"""The running batch's key/value cache: per layer, (rows, heads, columns, head_dim) buffers with room to spare.

Rows are left-padded to a shared length (the attention mask says which columns are real), so a decode
step appends one column for every row at once. The batch uses rows [0, rows) and columns
[start, length) of each buffer; everything past them is spare:

- a step writes its keys and values into column `length` in place (a `torch.cat` per layer and step
  would copy the whole cache every time); the buffers grow, by a copy, once per `SPARE` steps;
- a finished row is replaced by the batch's last row (one row copied, `compact`), not by copying
  every other row into new buffers;
- columns that became padding in every row are dropped by moving `start` (`trim`);
- new rows are copied into spare rows (`join`), right-aligned with the batch; only a prompt longer
  than the columns in use and in front of them makes new buffers.

Columns in use that a row does not own (its left padding) hold zeros or another row's old values:
finite numbers, masked out by the attention mask. `join` zeroes them for the rows it places, since a
masked column still meets its attention weight of exactly 0, and 0·NaN would be NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPARE = 64  # columns added past the need when the buffers grow


class BatchCache:
    """Keys and values of every layer for a batch of left-padded rows."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int):
        self.layers = layers  # per layer (K, V), each (row capacity, heads, column capacity, head_dim)
        self.rows = layers[0][0].shape[0]
        self.start = 0
        self.length = length  # the end of the columns in use

    @classmethod
    def of(cls, cache) -> BatchCache:
        """Take over a transformers `DynamicCache` (after a forward that filled it), without copying."""
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return cls(layers, layers[0][0].shape[2])

    @property
    def width(self) -> int:
        """Columns in use."""
        return self.length - self.start

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values in use, (rows, heads, width, head_dim) each."""
        K, V = self.layers[layer]
        return K[:self.rows, :, self.start:self.length], V[:self.rows, :, self.start:self.length]

    def dynamic(self):
        """The columns in use as a transformers `DynamicCache` (views), for a forward through the model itself."""
        from transformers import DynamicCache

        return DynamicCache([self.view(i) for i in range(len(self.layers))])

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more columns after `length` (new buffers, holding only what is in use, if needed)."""
        if self.length + columns <= self.layers[0][0].shape[2]:
            return
        self._rebuild(self.rows, front=0, columns=self.width + columns + SPARE)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's (rows, heads, T, head_dim) keys and values from column `length` on (after
        `reserve(T)`); return the layer's keys and values in use, up to the last of them. `advance(T)`
        moves `length` once every layer wrote."""
        K, V = self.layers[layer]
        n, end = self.length, self.length + keys.shape[2]
        K[:self.rows, :, n:end] = keys
        V[:self.rows, :, n:end] = values
        return K[:self.rows, :, self.start:end], V[:self.rows, :, self.start:end]

    def advance(self, columns: int = 1) -> None:
        self.length += columns

    def trim(self, columns: int) -> None:
        """Stop using the first `columns` columns in use (padding in every row)."""
        self.start += columns

    def compact(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` (ascending), filling the holes they leave with the last kept rows. Returns the
        new order: row j now holds what row order[j] held."""
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]  # as many as there are holes
        if holes:
            src = torch.tensor(movers, device=self.layers[0][0].device)
            dst = torch.tensor(holes, device=src.device)
            for K, V in self.layers:
                K[dst, :, self.start:self.length] = K[src, :, self.start:self.length]
                V[dst, :, self.start:self.length] = V[src, :, self.start:self.length]
        self.rows = n
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        return order

    def select(self, keep: list[int]) -> BatchCache:
        """A new cache of rows `keep` only."""
        index = torch.tensor(keep, device=self.layers[0][0].device)
        layers = [(K.index_select(0, index), V.index_select(0, index))
                  for K, V in (self.view(i) for i in range(len(self.layers)))]
        return BatchCache(layers, self.width)

    def join(self, other: BatchCache) -> None:
        """Add `other`'s rows after this batch's, right-aligned (the shorter side is left-padded)."""
        grow = max(0, other.width - self.width)  # columns needed in front of those in use
        rows, capacity = self.rows + other.rows, self.layers[0][0].shape[0]
        if rows > capacity or grow > self.start:
            capacity = rows + rows // 2 if rows > capacity else capacity  # room for the next joins too
            self._rebuild(capacity, front=grow, columns=grow + self.width + SPARE)
        elif grow:
            self.start -= grow
            for K, V in self.layers:  # the batch's rows own nothing there
                K[:self.rows, :, self.start:self.start + grow] = 0
                V[:self.rows, :, self.start:self.start + grow] = 0
        new = slice(self.rows, rows)
        own = self.length - other.width  # where the new rows' columns begin
        for (K, V), i in zip(self.layers, range(len(other.layers))):
            K2, V2 = other.view(i)
            K[new, :, self.start:own] = 0
            V[new, :, self.start:own] = 0
            K[new, :, own:self.length] = K2
            V[new, :, own:self.length] = V2
        self.rows = rows

    def _rebuild(self, row_capacity: int, front: int, columns: int) -> None:
        """New zeroed buffers of `row_capacity` rows and `columns` columns holding the rows and columns in
        use from column `front` on."""
        grown = []
        for K, V in self.layers:
            _, heads, _, dim = K.shape
            K2 = K.new_zeros(row_capacity, heads, columns, dim)
            V2 = V.new_zeros(row_capacity, heads, columns, dim)
            K2[:self.rows, :, front:front + self.width] = K[:self.rows, :, self.start:self.length]
            V2[:self.rows, :, front:front + self.width] = V[:self.rows, :, self.start:self.length]
            grown.append((K2, V2))
        self.layers = grown
        self.start, self.length = 0, front + self.width


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros in front along dim 1 of a (B, L) mask."""
    missing = width - t.shape[1]
    return t if missing == 0 else F.pad(t, (missing, 0))
