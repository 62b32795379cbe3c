"""Trainable token rows (PEFT's `trainable_token_indices`): a few rows of a token matrix trained in full.

A chat fine-tune that adds or changes a handful of tokens trains their rows beside LoRA. Per adapter a
`TokenLayer` holds the token ids and `values` (k, dim), the rows those ids get; its forward is the base's
with those rows replaced:

    embedding:   y[t] = values[j] · embed_scale       where ids[t] = indices[j]; else base(ids)[t]
    output head: y[..., indices[j]] = x · values[j] + b[indices[j]]      (a Linear: its weight rows are tokens)

The rows replace, they do not add (PEFT's choice: a resized vocabulary's random new rows never leak into the
result), so an adapter's weight in a mix does not scale them. Where the base ties its output head to the
input embedding, the head gets the embedding's rows as well: the same parameter, saved once, under the
embedding, as `<module>.token_adapter.trainable_tokens_delta` (PEFT's name; it holds values, not deltas).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.layers import AdapterParameters
from lorakit.modules import matches, output_head


def token_rows(module: nn.Module) -> int | None:
    """How many token rows a module's weight has (an Embedding's vocabulary, a Linear head's outputs), or
    None for a module whose weight rows are not tokens (GPT-2's Conv1D is (in, out); NF4 is packed)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    if type(module) is nn.Linear:
        return module.out_features
    return None


def plan(model: nn.Module, config: LoraConfig, modules: dict[str, nn.Module],
         taken: set[str]) -> list[tuple[str, list[int], str | None]]:
    """(module, token ids, the module whose rows it shares or None) for each token layer `config` asks for.

    `modules`: name -> base module as the user's model has them; `taken`: the modules LoRA or modules_to_save
    adapt, which cannot also get token rows. Refuses unknown names, other kinds of layer and ids past the
    vocabulary; changes nothing.
    """
    wanted = config.trainable_token_indices
    if wanted is None:
        return []
    embedding = _input_embedding(model)
    if isinstance(wanted, list):
        if embedding is None:
            raise UserError("trainable_token_indices is a list, which means the input embedding, but this model "
                            "has no get_input_embeddings(); give {module name: token ids} instead")
        wanted = {embedding: wanted}
    found: dict[str, list[int]] = {}
    for key, ids in wanted.items():
        hits = [name for name in modules if name and matches([key], name)]
        if not hits:
            raise UserError(f"trainable_token_indices names {key!r}, which matches no module of this model")
        twice = next((name for name in hits if found.get(name, ids) != ids), None)
        if twice is not None:  # which list would win is a guess (the file check and the layer took different ones)
            raise UserError(f"trainable_token_indices gives {twice!r} two lists of token ids (under two keys, the "
                            f"last {key!r}); give each module one list")
        found.update((name, ids) for name in hits)
    shared: dict[str, str] = {}
    head = _tied_head(model, modules, embedding)
    # PEFT gives a tied head the embedding's rows unless the config gives the head ids of its own
    if head is not None and embedding in found and found.get(head, found[embedding]) == found[embedding]:
        if head in taken:
            raise UserError(f"{head!r} is tied to the input embedding, so it takes the rows trainable_token_indices "
                            f"trains, and it is in target_modules too; PEFT stacks LoRA on those rows, which lorakit "
                            f"does not: leave {head!r} out of target_modules, or load this adapter with PEFT")
        found.pop(head, None)  # after the embedding, whose rows it takes
        found[head] = found[embedding]
        shared[head] = embedding
    for name, ids in found.items():
        _check(name, modules[name], ids, taken)
    return [(name, ids, shared.get(name)) for name, ids in found.items()]


def _check(name: str, module: nn.Module, ids: list[int], taken: set[str]) -> None:
    if name in taken:
        raise UserError(f"module {name!r} is in target_modules or modules_to_save and in trainable_token_indices; "
                        "one module takes one of them (as in PEFT), so leave it out of one")
    rows = token_rows(module)
    if rows is None:
        raise UserError(f"trainable_token_indices names {name!r}, a {type(module).__name__}; token rows can be "
                        "trained in an Embedding or a Linear output head only")
    check_ids(ids, rows, "trainable_token_indices", f"the {rows} rows of {name!r}",
              "; is the adapter for a base with a larger vocabulary?")


def check_ids(ids: list[int], rows: int, source: str, table: str, hint: str = "") -> None:
    """Refuse token ids past a table of `rows` rows, in words the caller gives: where the ids came from
    (`source`: a flag or a config field) and what the table is."""
    if ids and max(ids) >= rows:
        raise UserError(f"{source}: token id {max(ids)} is past {table} (ids 0 to {rows - 1}){hint}")


def _input_embedding(model: nn.Module) -> str | None:
    """The name of the module `model.get_input_embeddings()` returns (transformers' rule), or None."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        return None
    return next((name for name, m in model.named_modules() if m is embedding), None)


def _tied_head(model: nn.Module, modules: dict[str, nn.Module], embedding: str | None) -> str | None:
    """The output head's name when the model's config ties it to the input embedding and they share a weight."""
    head = output_head(model)
    config = getattr(model, "config", None)
    if head is None or embedding is None or not getattr(config, "tie_word_embeddings", False):
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None or getattr(modules.get(name), "weight", None) is not modules[embedding].weight:
        return None
    return name


class TokenLayer(nn.Module):
    """A frozen Embedding or Linear head plus, per adapter, the values of a few token rows."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.kind = "embedding" if isinstance(base, nn.Embedding) else "head"
        self.values = AdapterParameters()  # name -> (k, dim): the rows the adapter's token ids get
        self.indices: dict[str, list[int]] = {}  # name -> the k token ids
        self.shared: set[str] = set()  # adapters whose values belong to the tied embedding (saved there)
        self.active: dict[str, float] = {}
        self.merged: dict[str, float] = {}
        self.originals: dict[str, torch.Tensor] = {}  # merged adapters -> the rows they overwrote (k, dim)
        self.untied_from: list[nn.Parameter] = []  # as in `LoraLayer.untie`
        self.disabled = False

    def add_adapter(self, name: str, ids: list[int], values: nn.Parameter | None = None,
                    initialize: bool = True) -> None:
        """Rows for `ids`: `values` when given (a tied head shares its embedding's), else new ones, which
        start as the base's rows (PEFT's init) or are left for the caller to copy saved ones in."""
        self.indices[name] = list(ids)
        if values is not None:
            self.values[name] = values
            self.shared.add(name)
            return
        W = self.base.weight  # (vocab, dim)
        # fp32 masters on a bf16/fp16 base, as LoRA's factors: small, and precise to update
        dtype = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
        device = torch.device("cpu") if W.is_meta else W.device
        rows = torch.empty(len(ids), W.shape[1], dtype=dtype, device=device)  # (k, dim)
        if initialize:
            with torch.no_grad():
                rows.copy_(W[torch.tensor(ids, device=W.device)])
        self.values[name] = nn.Parameter(rows)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base; unmerge before deleting it")
        del self.values[name]
        del self.indices[name]
        self.shared.discard(name)
        self.active.pop(name, None)

    def running(self) -> list[str]:
        """The adapters the forward applies: active, held by this layer, not merged into the base."""
        return [n for n in self.active if n in self.indices and n not in self.merged]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        for name in self.running():
            ids = torch.tensor(self.indices[name], device=y.device)  # (k,)
            y = self._embed(x, y, ids, self.values[name]) if self.kind == "embedding" else \
                self._head(x, y, ids, self.values[name])
        return y

    def _embed(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        hit = x.unsqueeze(-1) == ids  # (..., k): which of the ids each token is
        slot = (hit.long() * torch.arange(len(ids), device=ids.device)).sum(-1)  # (...,): j, or 0 where no hit
        rows = F.embedding(slot, values.to(y.dtype))  # (..., dim); meaningless where no hit
        scale = getattr(self.base, "embed_scale", None)  # scaled embeddings (Gemma) scale every row
        if scale is not None:
            rows = rows * scale.to(rows.dtype)
        # torch.where, not an in-place write: the rows get their gradient, the frozen base output none
        return torch.where(hit.any(-1, keepdim=True), rows, y)  # (..., dim)

    def _head(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        bias = None if self.base.bias is None else self.base.bias[ids].to(y.dtype)
        logits = F.linear(x.to(y.dtype), values.to(y.dtype), bias)  # (..., k): only the replaced rows' logits
        return y.index_copy(-1, ids, logits)  # (..., vocab)

    # -- merge ----------------------------------------------------------------------------------

    def check_mergeable(self) -> None:
        """Merging writes rows into one weight: two running adapters must not both write one row."""
        seen: set[int] = set()
        for name in self.running():
            if seen & set(self.indices[name]):
                raise UserError(f"adapters {', '.join(self.running())} replace some of the same token rows; "
                                "merge them one at a time (set_adapters to one)")
            seen |= set(self.indices[name])

    @torch.no_grad()
    def merge(self) -> None:
        """Write every running adapter's rows into base.weight, keeping the rows they replace."""
        W = self.base.weight  # (vocab, dim)
        for name in self.running():
            ids = torch.tensor(self.indices[name], device=W.device)
            self.originals[name] = W[ids].clone()  # (k, dim), exact: unmerge writes these bits back
            W.index_copy_(0, ids, self.values[name].to(W.dtype))
            self.merged[name] = self.active[name]

    def untie(self) -> None:
        """Give base.weight a copy of its own before a merge writes into it (see `LoraLayer.untie`)."""
        if not self.untied_from:
            self.untied_from.append(self.base.weight)
            self.base.weight = nn.Parameter(self.base.weight.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.untied_from:  # the shared weight was never written: take it back, exactly
            self.base.weight = self.untied_from.pop()
            self.originals.clear()
        for name in reversed(list(self.merged)):
            if name in self.originals:
                ids = torch.tensor(self.indices[name], device=self.base.weight.device)
                self.base.weight.index_copy_(0, ids, self.originals.pop(name))
        self.merged.clear()

    def extra_repr(self) -> str:
        held = ", ".join(f"{n}: {len(ids)} rows" for n, ids in self.indices.items())
        return f"kind={self.kind}, adapters=[{held}], active={list(self.active)}, merged={list(self.merged)}"
