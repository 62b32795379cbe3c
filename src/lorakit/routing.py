"""Per-row adapters for a mixed batch: row b of the batch applies its own adapter mix.

    routing = RowRouting(["legal", None, {"legal": 0.5, "poetry": 1.0}])   # one entry per batch row
    with lorakit.per_row_adapters(model, routing):                         # (a plain list works too)
        logits = model(input_ids).logits

For a layer with base output y and input x, each row b gets

    y[b] += Σ_{(a, w) in mix[b]}  w · s_a · B_a · A_a · x[b]            s_a = the adapter's alpha / r

computed BGMV-style (Punica, S-LoRA), so the cost is that of one adapter whatever the adapter count:

    As  = [0; A_1; …; A_n]       (1+n, r, in)     every adapter of the layer behind a zero slot,
    Bts = [0; B_1ᵀ; …; B_nᵀ]     (1+n, r, out)    zero-padded to the largest rank
    index[b, j] = slot of row b's j-th adapter (0: none),  scale[b, j] = w · s_a      (batch, k)
    h = x[b] · As[index[b]]ᵀ · scale[b]                    (batch, L, k·r)    a row of k adapters = rank k·r
    y[b] += h · Bts[index[b]]                              (batch, L, out)

Gathering copies each row's matrices, which for a decode step (one token per row) costs as much as
the products themselves. When the batch's adapters are few against its rows (one adapter or one mix
for every client, a handful of adapters spread over the rows: a server's common case), the layer
instead runs every adapter the batch uses on every row and zeroes what a row does not use:

    A_u  = [A_a; A_b; …]          (R, in)    the batch's adapters at their own ranks, R = Σ r (no padding)
    Bt_u = [s_a B_aᵀ; s_b B_bᵀ; …] (R, out)
    W[b] = w of row b's adapter for each of its r columns, 0 for the adapters it does not use   (batch, R)
    y   += ((x · A_uᵀ) ⊙ W) · Bt_u                       two plain matmuls, nothing copied per row

`_dense_is_cheaper` picks between the two by their arithmetic (R per token against k·r per row).
Where every row applies the same mix (a server's clients all asking for one blend), its weights are
folded into Bt_u once, kept with the stacked weights, and W is skipped: the mix then costs a step what
one adapter of rank R costs. (Not where some rows are the base alone: a weight large enough to overflow
Bt_u would turn their zero weights into NaN, and W costs the same whether it masks or weighs.)

An Embedding base, or an adapter with dropout in training mode, takes the plain loop over adapters
(`_add_one_by_one`) instead. A layer where some row applies a DoRA or lora_bias adapter groups the rows
by their mix and runs each group through the layer's own sequential path (`_add_by_mix`): a DoRA
adapter rescales the running output per feature (see `lorakit.variants.dora`), so a row's adapters are
not a sum of low-rank products and their order matters.

Everything this needs between forwards lives here, in plain view: `AdapterStacks` owns each layer's
stacked (As, Bts), rebuilt only when the layer's adapters change; a `RowRouting` owns the mixes and,
per layer, the gather indices. A server decoding many steps with the same rows keeps one `RowRouting`
and one `AdapterStacks` (shared by the routings of later batches), so a step pays for neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from lorakit.errors import UserError

RowSpec = str | dict[str, float] | None
"""One row's adapters: a name (weight 1), a {name: weight} mix, or None (the base alone)."""


class RoutedLayer(Protocol):
    """What routing reads of a LoRA layer (`lorakit.layers.LoraLayer` has it)."""

    kind: str
    in_features: int
    out_features: int
    lora_A: nn.ParameterDict  # name -> (r, in); `by_name()` gives it as a plain dict (layers.AdapterParameters)
    lora_B: nn.ParameterDict  # name -> (out, r)
    scaling: dict[str, float]
    dropout: nn.ModuleDict  # name -> its nn.Dropout, for the adapters with p > 0
    revision: int  # moves whenever an adapter is added or deleted

    def plain(self, name: str) -> bool: ...

    def add_update(self, x: torch.Tensor, result: torch.Tensor, name: str, weight: float) -> torch.Tensor: ...

    def project_down(self, x: torch.Tensor, name: str, weight: float) -> torch.Tensor: ...


# -- the stacked weights ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterStack:
    """Every adapter of one layer stacked behind a zero slot, zero-padded to one rank."""

    key: tuple  # the layer's revision, then (name, storages, versions) per adapter: stale once one differs
    slots: dict[str, int]  # adapter name -> its slot (from 1; slot 0 is all zeros)
    A: torch.Tensor  # (1+n, r, in)
    Bt: torch.Tensor  # (1+n, r, out)


@dataclass(frozen=True)
class LayerAdapters:
    """What routing reads of one layer's adapters that only adding or deleting one changes (its `revision`)."""

    revision: int
    ranks: dict[str, int]  # in the layer's order
    plain: dict[str, bool]  # plain LoRA (no DoRA magnitude, no lora_bias)
    dropouts: dict[str, nn.Module]  # the nn.Dropout of each adapter with p > 0


class AdapterStacks:
    """Each layer's `AdapterStack` and `LayerAdapters`, built on first use.

    Inference reuses a stack until an adapter of its layer is added or removed or its weights are
    changed in place by ordinary ops (a server swapping adapters rebuilds it once per swap, not once per
    token; writes through `.data` bypass the version counter: use a new `AdapterStacks` after those).
    Under autograd a stack is built for every forward, so that gradients reach the parameters.
    """

    def __init__(self) -> None:
        self._stacks: dict[nn.Module, AdapterStack] = {}  # not buffers: never saved, moved or counted
        # per layer: the stack key they were made from, and {names: (A_uᵀ, {weights: Bt_u})} (see `concatenated`)
        self._concatenated: dict[nn.Module, tuple[tuple, dict[tuple, tuple[torch.Tensor, dict]]]] = {}
        self._adapters: dict[nn.Module, LayerAdapters] = {}

    def adapters(self, layer: RoutedLayer) -> LayerAdapters:
        """The layer's `LayerAdapters`, read again only once its revision moves: a server's new batch
        (a new routing) then costs each layer a few dict lookups, not a walk over its adapter tables."""
        known = self._adapters.get(layer)
        if known is None or known.revision != layer.revision:
            ranks = {n: A.shape[0] for n, A in layer.lora_A.by_name().items()}
            known = self._adapters[layer] = LayerAdapters(layer.revision, ranks, {n: layer.plain(n) for n in ranks},
                                                          dict(layer.dropout.items()))
        return known

    def get(self, layer: RoutedLayer) -> AdapterStack:
        A, B = layer.lora_A.by_name(), layer.lora_B.by_name()  # plain dicts by adapter name: no module lookups
        # the revision too: a deleted adapter's memory may come back, same address and version, to a new one
        key = (layer.revision,
               *((n, A[n].data_ptr(), A[n]._version, B[n].data_ptr(), B[n]._version) for n in sorted(A)))
        if torch.is_grad_enabled():
            return _stack(layer, key)
        cached = self._stacks.get(layer)
        if cached is None or cached.key != key:
            cached = self._stacks[layer] = _stack(layer, key)
        return cached


    def concatenated(self, layer: RoutedLayer, stack: AdapterStack, names: tuple[str, ...],
                     weights: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_uᵀ, Bt_u): the adapters `names` of `layer` at their own ranks, (in, Σr) and (Σr, out), each
        adapter's scaling s (times its weight w, where `weights` gives one per name) folded into its rows
        of Bt_u. Kept, like `stack` (the layer's current one, from `get`), until the layer's adapters change:
        at most 64 sets of names per layer, and 4 sets of weights per set of names (a client may send a
        new mix with every request; the memory must not grow with them)."""
        if torch.is_grad_enabled():
            return _concatenate_A(layer, names), _concatenate_B(layer, names, weights)
        key = stack.key
        known = self._concatenated.get(layer)
        if known is None or known[0] != key:
            known = self._concatenated[layer] = (key, {})
        found = known[1].get(names)
        if found is None:
            if len(known[1]) >= 64:  # a server cycling through many adapter sets: keep the memory bounded
                known[1].clear()
            found = known[1][names] = (_concatenate_A(layer, names), {})
        At, Bts = found
        Bt = Bts.get(weights)
        if Bt is None:
            if len(Bts) >= 4:
                Bts.clear()
            Bt = Bts[weights] = _concatenate_B(layer, names, weights)
        return At, Bt


def _concatenate_A(layer: RoutedLayer, names: tuple[str, ...]) -> torch.Tensor:
    """A_uᵀ (in, Σr), contiguous for the down projection's matmul."""
    return torch.cat([layer.lora_A[n] for n in names]).t().contiguous()


def _concatenate_B(layer: RoutedLayer, names: tuple[str, ...], weights: tuple[float, ...] | None) -> torch.Tensor:
    """Bt_u (Σr, out): each adapter's Bᵀ times s (times w, one per name, where `weights` is given)."""
    factors = [layer.scaling[n] for n in names]
    if weights is not None:
        factors = [s * w for s, w in zip(factors, weights)]
    return torch.cat([layer.lora_B[n].t() * f for n, f in zip(names, factors)])


def _stack(layer: RoutedLayer, key: tuple) -> AdapterStack:
    names = [k[0] for k in key[1:]]
    ranks = [layer.lora_A[n].shape[0] for n in names]
    first = layer.lora_A[names[0]]
    zero_A = first.new_zeros(1, max(ranks), layer.in_features)  # (1, r, in)
    zero_Bt = first.new_zeros(1, max(ranks), layer.out_features)  # (1, r, out)
    if len(set(ranks)) == 1:
        A = torch.cat([zero_A, torch.stack([layer.lora_A[n] for n in names])])  # (1+n, r, in)
        Bt = torch.cat([zero_Bt, torch.stack([layer.lora_B[n].t() for n in names])])  # (1+n, r, out)
    else:
        A = zero_A.new_zeros(1 + len(names), max(ranks), layer.in_features)
        Bt = zero_Bt.new_zeros(1 + len(names), max(ranks), layer.out_features)
        for i, (n, r) in enumerate(zip(names, ranks), start=1):
            A[i, :r] = layer.lora_A[n]
            Bt[i, :r] = layer.lora_B[n].t()
    return AdapterStack(key, {n: i for i, n in enumerate(names, start=1)}, A, Bt)


# -- the routing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mixes:
    """A routing's mixes restricted to the adapters some layers hold (the same for all those layers)."""

    mixes: list[dict[str, float]]  # per row
    names: tuple[str, ...]  # every adapter some row applies, in order of first use
    k: int  # the most adapters one row applies
    folded: tuple[float, ...] | None  # the weights per name of the one mix every row applies, if so


@dataclass
class _LayerRoute:
    """A routing as one layer sees it: only the adapters the layer holds."""

    revision: int  # the layer's `revision` when this was made: its adapters then
    shared: _Mixes  # the mixes as this layer applies them (shared by the layers holding the same adapters)
    plain: bool  # every adapter of `shared.names` plain LoRA (no DoRA magnitude, no lora_bias)
    dropouts: list[nn.Module]  # the nn.Dropout of each adapter of `names` that has one
    ranks: tuple[int, ...]  # of `names`
    stack: AdapterStack | None = None  # what `index` points into
    index: torch.Tensor | None = None  # (batch, k) slots
    scale: torch.Tensor | None = None  # (batch, k) w · s per slot
    weights: torch.Tensor | None = None  # (batch, Σr) each row's weight per column of the concatenated adapters
    all_ones: bool = False  # every row applies every adapter of `names` at weight 1: no weights to apply

    @property
    def mixes(self) -> list[dict[str, float]]:
        return self.shared.mixes

    @property
    def names(self) -> tuple[str, ...]:
        return self.shared.names


class RowRouting:
    """Which adapters each row of a batch applies; see the module docstring for the maths.

    `rows[i]` is a name (weight 1), a {name: weight} mix, or None (the base alone). Names are checked
    against a model by `lorakit.per_row_adapters`; a layer skips the adapters it does not hold.
    `stacks` may be shared by several routings (a server's batches) to keep the stacked weights.
    """

    def __init__(self, rows: Sequence[RowSpec], stacks: AdapterStacks | None = None):
        if isinstance(rows, (str, dict)) or not isinstance(rows, Sequence):
            raise UserError(f"per-row adapters take one entry per batch row (a list), got {type(rows).__name__}")
        self.mixes: list[dict[str, float]] = [_mix(i, spec) for i, spec in enumerate(rows)]
        # every name a row gives, also at weight 0, so that a misspelt one is reported, not skipped
        self._named = list(dict.fromkeys(n for spec in rows for n in ([spec] if isinstance(spec, str) else spec or ())))
        self.stacks = stacks if stacks is not None else AdapterStacks()
        self._layers: dict[nn.Module, _LayerRoute] = {}
        self._held: dict[tuple[str, ...], _Mixes] = {}  # a layer's adapter names -> its `_Mixes`
        self._weights: dict[tuple, tuple[torch.Tensor, bool]] = {}  # see `_column_weights`

    def __len__(self) -> int:
        return len(self.mixes)

    def adapters(self) -> list[str]:
        """Every adapter some row names (also at weight 0), in order of first use."""
        return list(self._named)

    def apply(self, layer: RoutedLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (the base's output for x) plus each row's own adapter mix."""
        if len(self.mixes) != x.shape[0]:
            raise ValueError(f"per-row adapters name {len(self.mixes)} rows but the batch has {x.shape[0]}")
        route = self._route(layer)
        if not route.names:
            return result
        if not route.plain:
            return _add_by_mix(layer, x, result, route)
        if layer.kind == "embedding" or any(d.training for d in route.dropouts):
            return _add_one_by_one(layer, x, result, route)
        stack = self.stacks.get(layer)
        if route.stack is not stack:  # the layer's adapters changed: new slots
            route.stack, route.index, route.scale, route.weights = stack, None, None, None
        if _dense_is_cheaper(x.numel() // layer.in_features, len(self.mixes), route.shared.k, stack.A.shape[1],
                             sum(route.ranks)):
            At, Bt = self.stacks.concatenated(layer, stack, route.names, route.shared.folded)
            if route.shared.folded is not None:  # the one mix of every row: its weights are in Bt
                return _add_dense(x, result, At, Bt, None)
            if route.weights is None or route.weights.device != x.device or route.weights.dtype != At.dtype:
                route.weights, route.all_ones = self._column_weights(route, At.dtype, x.device)
            return _add_dense(x, result, At, Bt, None if route.all_ones else route.weights)
        if route.index is None or route.index.device != x.device:
            route.index, route.scale = _gather_index(route.mixes, stack, layer.scaling, x.device)
        return _add_gathered(layer, x, result, stack, route.index, route.scale)

    def _route(self, layer: RoutedLayer) -> _LayerRoute:
        route = self._layers.get(layer)
        if route is None or route.revision != layer.revision:
            adapters = self.stacks.adapters(layer)
            held = tuple(adapters.ranks)
            shared = self._held.get(held)
            if shared is None:  # the same for every layer holding these adapters: made once per routing
                shared = self._held[held] = _restrict(self.mixes, set(held))
            names = shared.names
            route = self._layers[layer] = _LayerRoute(
                adapters.revision, shared, all(adapters.plain[n] for n in names),
                [adapters.dropouts[n] for n in names if n in adapters.dropouts],
                tuple(adapters.ranks[n] for n in names))
        return route

    def _column_weights(self, route: _LayerRoute, dtype: torch.dtype,
                        device: torch.device) -> tuple[torch.Tensor, bool]:
        """`_column_weights`, shared by the layers whose adapters have the same names and ranks."""
        key = (id(route.shared), route.ranks, dtype, device)  # one `_Mixes` per adapter set, see `_held`
        found = self._weights.get(key)
        if found is None:
            found = self._weights[key] = _column_weights(route.mixes, route.names, route.ranks, dtype, device)
        return found


def _restrict(mixes: list[dict[str, float]], held: set[str]) -> _Mixes:
    """The rows' mixes as a layer holding the adapters `held` applies them; `folded` where every row
    applies one mix (the same names at the same weights, in any order) and some weight is not 1."""
    mixes = [{n: w for n, w in mix.items() if n in held} for mix in mixes]
    names = tuple(dict.fromkeys(n for m in mixes for n in m))
    k = max((len(m) for m in mixes), default=0)
    distinct = {frozenset(m.items()) for m in mixes}
    if len(distinct) != 1 or not names:
        return _Mixes(mixes, names, k, None)
    common = mixes[0]  # every row's mix (in any order): its names are `names`
    folded = None if all(w == 1 for w in common.values()) else tuple(common[n] for n in names)
    return _Mixes(mixes, names, k, folded)


def _mix(row: int, spec: RowSpec) -> dict[str, float]:
    """A row's spec as {name: weight}, zero weights dropped ('a' means {'a': 1.0}, None means {})."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {spec: 1.0}
    if not isinstance(spec, dict):
        raise UserError(f"row {row} of the per-row adapters is a {type(spec).__name__}; give an adapter name, "
                        "a {name: weight} dict, or None for the base")
    mix = {}
    for name, weight in spec.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"row {row}: the weight of adapter {name!r} must be a finite number, got {weight!r}")
        if weight != 0:
            mix[name] = float(weight)
    return mix


def _dense_is_cheaper(tokens: int, rows: int, k: int, padded_rank: int, used_rank: int) -> bool:
    """Whether every used adapter on every token (`tokens` x `used_rank` multiply-adds per feature) costs
    less than gathering: `rows` x k·r matrices copied, at about three multiply-adds per copied element,
    and then applied to each row's tokens."""
    return tokens * used_rank <= rows * k * padded_rank * (tokens / rows + 3)


@torch.inference_mode(False)  # kept by the routing: also usable once grad is on again
def _column_weights(mixes: list[dict[str, float]], names: tuple[str, ...], ranks: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, bool]:
    """(batch, 1, Σr): row b's weight for each column of the adapters `names` concatenated (ranks `ranks`;
    0: not used); and whether all of them are 1."""
    per_name = torch.tensor([[mix.get(n, 0.0) for n in names] for mix in mixes], dtype=dtype)  # (batch, n)
    weights = per_name.repeat_interleave(torch.tensor(ranks), dim=1)  # (batch, Σr)
    return weights.unsqueeze(1).to(device), bool((weights == 1).all())


def _add_dense(x: torch.Tensor, result: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor,
               weights: torch.Tensor | None) -> torch.Tensor:
    """Every used adapter on every row, each row's weights (None: all 1) zeroing what it does not use."""
    rank = At.shape[1]
    h = torch.mm(x.reshape(-1, At.shape[0]).to(At.dtype), At)  # (tokens, Σr)
    if weights is not None:  # (batch, 1, Σr) over each row's tokens
        h = (h.view(x.shape[0], -1, rank) * weights).view(-1, rank)
    flat, h, Bt = result.reshape(-1, Bt.shape[1]), h.to(result.dtype), Bt.to(result.dtype)
    if torch.is_grad_enabled():
        return torch.addmm(flat, h, Bt).view_as(result)
    return flat.addmm_(h, Bt).view_as(result)  # in place: inference makes no copy


@torch.inference_mode(False)  # kept by the routing: also usable once grad is on again
def _gather_index(mixes: list[dict[str, float]], stack: AdapterStack, scaling: dict[str, float],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, scale), both (batch, k): each row's slots in `stack` and w · s for each; k = the most
    adapters one row mixes. Empty slots (and base-only rows) gather the zero slot: exact zeros."""
    k = max(1, max(len(m) for m in mixes))
    index = [[0] * k for _ in mixes]
    scale = [[0.0] * k for _ in mixes]
    for row, mix in enumerate(mixes):
        for j, (name, weight) in enumerate(mix.items()):
            index[row][j], scale[row][j] = stack.slots[name], scaling[name] * weight
    return torch.tensor(index, device=device), torch.tensor(scale, dtype=stack.A.dtype, device=device)


def _add_gathered(layer: RoutedLayer, x: torch.Tensor, result: torch.Tensor, stack: AdapterStack,
                  index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gather each row's A and B and do two batched matmuls (the module docstring's last two lines).

    The work is that of a single adapter (plus gathering a few rank-r matrices), where a loop over
    adapters would pay per adapter for its own small matmuls and a copy of the output.
    """
    batch, k = index.shape
    r, out = stack.A.shape[1], layer.out_features
    xb = x.reshape(batch, -1, layer.in_features).to(stack.A.dtype)  # (batch, L, in)
    A = stack.A[index].reshape(batch, k * r, layer.in_features)  # (batch, k·r, in)
    h = torch.bmm(xb, A.transpose(1, 2))  # (batch, L, k·r)
    h = (h.view(batch, -1, k, r) * scale.view(batch, 1, k, 1)).view(batch, -1, k * r)  # scaled at rank r
    Bt = stack.Bt[index].reshape(batch, k * r, out).to(result.dtype)  # (batch, k·r, out)
    flat = result.reshape(batch, -1, out)  # (batch, L, out)
    if torch.is_grad_enabled():
        return torch.baddbmm(flat, h.to(result.dtype), Bt).view_as(result)
    return flat.baddbmm_(h.to(result.dtype), Bt).view_as(result)  # in place: inference makes no copy


def _add_one_by_one(layer: RoutedLayer, x: torch.Tensor, result: torch.Tensor, route: _LayerRoute) -> torch.Tensor:
    """One adapter at a time, over the rows that use it (Embedding bases, or dropout in training mode)."""
    for name in route.names:
        rows = [i for i, mix in enumerate(route.mixes) if name in mix]
        weights = torch.tensor([route.mixes[i][name] for i in rows], device=x.device)  # (n,)
        index = torch.tensor(rows, device=x.device)
        h = layer.project_down(x.index_select(0, index), name, 1.0).to(result.dtype)  # (n, ..., r)
        h = h * weights.to(h.dtype).view(-1, *[1] * (h.dim() - 1))
        delta = h @ layer.lora_B[name].to(result.dtype).t()  # (n, ..., out)
        result = result.index_add(0, index, delta)
    return result


def _add_by_mix(layer: RoutedLayer, x: torch.Tensor, result: torch.Tensor, route: _LayerRoute) -> torch.Tensor:
    """Rows grouped by their mix, each group's adapters applied in order by the layer's own path: what
    `set_adapters` with that mix computes, for the rows that asked for it (DoRA and lora_bias adapters)."""
    groups: dict[tuple, list[int]] = {}
    for i, mix in enumerate(route.mixes):
        if mix:
            groups.setdefault(tuple(mix.items()), []).append(i)
    for mix, rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        xs, part = x.index_select(0, index), result.index_select(0, index)  # (n, ..., in), (n, ..., out)
        for name, weight in mix:
            part = layer.add_update(xs, part, name, weight)
        result = result.index_copy(0, index, part)
    return result
