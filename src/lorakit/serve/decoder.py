"""A lean forward for Llama-shaped models' prefill and decode steps: the model's own maths, less Python.

A server's decode step feeds one token per row through a small model many times a second, and there the
time goes to Python, not to arithmetic: transformers' forward builds a 4-D attention mask, checks its
arguments and outputs, dispatches attention through a registry and concatenates every layer's whole
cache, on every step (on the embedded base at batch 8 that forward takes ~1.5x the time of this one,
~2x at batch 32). This step does what that forward computes for a decode step, written out (a
prefill is the same with T tokens per row, a causal mask and a new cache):

    x = embed(ids)                                   # (B, 1, d)
    cos, sin = rotary(x, positions)                  # the model's own rotary module (any RoPE scaling)
    for each layer:
        h = input_norm(x)
        q, k, v = q_proj(h), k_proj(h), v_proj(h)    # (B, H, 1, D) after the head split
        q, k = rope(q), rope(k)
        K, V = cache.write(layer, k, v)              # in place, into spare columns
        x = x + o_proj(attention(q, K, V, mask))     # scaled dot product, padding masked
        x = x + mlp(post_attention_norm(x))
    logits = lm_head(norm(x))                        # (B, 1, vocab)

`Decoder.run` takes several groups of rows in one pass: the engine's running rows (one token each,
after their cache) and the new prompts joining them (P tokens each, no cache yet). Every group's tokens
are rows of one (N, d) hidden state, so each weight is read once for all of them; only attention and
the cache are per group, and each group has its own adapter routing. A prompt therefore costs its
rows in the products, not a forward of its own.

Every norm, the MLP activation and the embedding are the model's own modules, called as they are,
and so are the projections, with one exception below: LoRA layers (with per-row routing), NF4 bases and biases
(Qwen2's q/k/v) behave as in the model's forward. Only the decoder-layer and attention wiring above is
ours, which is why it is used only for the architectures whose wiring it is (`Decoder.of` checks both
the type and the module layout) and otherwise the engine runs the model's forward. Tests hold it to
that forward: the same logits to 1e-4, the same greedy tokens.

The exception: a decode step multiplies a few rows by every weight of the model, and how fast a BLAS
does a few-row product depends on the layout it is asked for. On an AVX2 EPYC with MKL, x·Wᵀ (what
`nn.Linear` asks for) at 8 rows is 1.3-3x slower than (W·xᵀ)ᵀ, the same product with W streamed row
by row (a decode step at batch 8 on the embedded base: 1.4x faster); on a Zen 5 with AVX-512 it is not
faster. So the engine takes the transposed form for plain `nn.Linear` weights, on inputs of at most
`FEW_ROWS` rows, in fp32 on CPUs without AVX-512 (`transposed_faster`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.base import cpu_info
from lorakit.layers import LoraLayer
from lorakit.mlp import is_gated_mlp, lean_forward
from lorakit.routing import RowRouting
from lorakit.serve.batch_cache import BatchCache

# Model types whose decoder layer is exactly the wiring in the module docstring (transformers' Llama code,
# which Mistral and Qwen2 copy; their sliding-window variants are refused by the engine's cache check).
ARCHITECTURES = frozenset({"llama", "mistral", "qwen2"})
LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
TRANSFORMERS_MODELS = tuple(f"transformers.models.{name}." for name in ARCHITECTURES)
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}
FEW_ROWS = 64  # the transposed product was measured faster from 4 to 64 rows; prompts take the plain one


@dataclass
class Rows:
    """A group of rows for `Decoder.run`: T new tokens per row (`ids`, `positions` (B, T)) after the L
    columns of `cache` (None: a prefill), `mask` (B, L + T) marking the real columns; `routing`: the rows'
    adapters (None: each LoRA layer's own routing); `every_position`: logits at every position, not only the last."""

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    cache: BatchCache | None = None
    routing: RowRouting | None = None
    every_position: bool = False


@dataclass(frozen=True)
class Part:
    """Consecutive rows of a product's input (N, in) that share a routing: `rows` rows of `tokens` // `rows` tokens."""

    rows: int
    tokens: int
    routing: RowRouting | None


class Decoder:
    """`forward` runs `model`'s prefill and decode steps the lean way over a `BatchCache`; made by `Decoder.of`."""

    def __init__(self, model: nn.Module, transposed: bool | None = None):
        config = model.config
        self.model = model
        self.inner = model.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.transposed = transposed  # plain Linear products as (W·xᵀ)ᵀ; None: `transposed_faster` decides on first use

    @classmethod
    def of(cls, model: nn.Module) -> Decoder | None:
        """The lean step for `model`, or None where its forward must run (another architecture or layout,
        or hooks on the modules this step bypasses)."""
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if getattr(config, "model_type", None) not in ARCHITECTURES or inner is None:
            return None
        if not all(hasattr(inner, part) for part in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return None
        if model.get_output_embeddings() is None:
            return None
        for layer in inner.layers:
            if {name for name, _ in layer.named_children()} != LAYER_PARTS:
                return None
            if any(not type(m).__module__.startswith(TRANSFORMERS_MODELS) for m in (layer, layer.self_attn)) \
                    or not is_gated_mlp(type(layer.mlp)):  # remote code may reuse a model type with other maths
                return None
            if {name for name, _ in layer.self_attn.named_children()} != ATTENTION_PARTS \
                    or not hasattr(layer.self_attn, "scaling"):
                return None
            if {name for name, _ in layer.mlp.named_children()} != MLP_PARTS:
                return None
        bypassed = [model, inner, inner.embed_tokens, *inner.layers,
                    *(m for layer in inner.layers for m in (layer.self_attn, layer.mlp))]
        for module in _projections(model):  # their forward may be bypassed too (the transposed product)
            bypassed += [module, module.base] if isinstance(module, LoraLayer) else [module]
        if any(m._forward_hooks or m._forward_pre_hooks or _replaced_forward(m) for m in bypassed):
            return None
        return cls(model)

    def project(self, module: nn.Module, x: torch.Tensor, parts: list[Part]) -> torch.Tensor:
        """`module(x)` for x (N, in), the rows of `parts` one after the other: one product with the base
        weight for all of them (as (W·xᵀ)ᵀ where that is faster), then each part's routed LoRA update
        added to its own rows as `LoraLayer.forward` would (disabled, or routing per row). A part
        without a routing takes the layer's (`per_row_adapters`); where that is none too, the layer's
        own forward runs."""
        lora = isinstance(module, LoraLayer) and not module.disabled
        base = module.base if isinstance(module, LoraLayer) else module
        routings = [module.routing if part.routing is None else part.routing for part in parts] if lora else []
        if None in routings:  # a part off the per-row path: each part apart, with the layer's own forward for it
            outputs = []
            for part, routing, xp in zip(parts, routings, x.split([p.tokens for p in parts])):
                shape = (part.rows, part.tokens // part.rows, -1)
                outputs.append(module(xp) if routing is None else
                               routing.apply(module, xp.view(shape), base(xp).view(shape)).flatten(0, 1))
            return torch.cat(outputs)
        if self.transposed and type(base) is nn.Linear and x.shape[0] <= FEW_ROWS:
            y = _transposed_linear(x, base.weight, base.bias)
        else:
            y = base(x)
        if not lora:
            return y
        start = 0
        for part, routing in zip(parts, routings):
            rows = y[start:start + part.tokens]  # (tokens, out), a view
            shape = (part.rows, part.tokens // part.rows)
            got = routing.apply(module, x[start:start + part.tokens].view(*shape, -1), rows.view(*shape, -1))
            if got.data_ptr() != rows.data_ptr():  # a path that does not add in place
                rows.copy_(got.view_as(rows))
            start += part.tokens
        return y

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: BatchCache | None,
                every_position: bool = False) -> tuple[torch.Tensor, BatchCache]:
        """T new tokens per row (`ids`, `positions` (B, T)) after the L columns of `cache` (None: none);
        `mask` (B, L + T) marks the real columns. Returns the logits ((B, T, vocab) or the last
        position's (B, 1, vocab)) and the cache with the new columns. Adapters: each LoRA layer's routing."""
        return self.run([Rows(ids, positions, mask, cache, every_position=every_position)])[0]

    def run(self, groups: list[Rows]) -> list[tuple[torch.Tensor, BatchCache]]:
        """`forward` for several groups of rows at once (a decode step's rows and new prompts' rows): the
        products take every group's tokens together, one pass over the weights; attention and the cache
        are each group's own. Returns each group's logits and cache."""
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        if self.transposed is None:
            self.transposed = transposed_faster(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                                                else self.inner.norm.weight.dtype, self.inner.norm.weight.device)
        parts = [Part(g.ids.shape[0], g.ids.numel(), g.routing) for g in groups]
        spans = list(zip(groups, itertools.accumulate([p.tokens for p in parts], initial=0)))  # (group, first row)
        N = sum(p.tokens for p in parts)
        attend = []
        for g in groups:
            past = 0 if g.cache is None else g.cache.width  # columns in use before the new ones
            if g.cache is not None:
                g.cache.reserve(g.ids.shape[1])
            attend.append(_attention_mask(g.mask, past, g.ids.shape[1]))  # (B, 1, T, L + T); None: every column
        x = torch.cat([self._embed(g).flatten(0, 1) for g in groups])  # (N, d)
        # per group, as its own forward would (dynamic RoPE scalings look at the largest position)
        rotary = [self.inner.rotary_emb(x, g.positions) for g in groups]  # (B, T, D) cos and sin per group
        cos, sin = (torch.cat([r[i].flatten(0, 1) for r in rotary])[:, None] for i in (0, 1))  # (N, 1, D): over heads
        fresh: list[list] = [[] for _ in groups]
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)  # (N, d)
            q = self.project(attn.q_proj, h, parts).view(N, H, D)
            k = self.project(attn.k_proj, h, parts).view(N, Hkv, D)
            v = self.project(attn.v_proj, h, parts).view(N, Hkv, D)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            outputs = []
            for j, (g, start) in enumerate(spans):
                B, T = g.ids.shape
                rows = slice(start, start + B * T)
                qg = q[rows].view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
                kg = k[rows].view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
                vg = v[rows].view(B, T, Hkv, D).transpose(1, 2)
                if g.cache is None:
                    K, V = kg, vg
                    fresh[j].append((kg, vg))
                else:
                    K, V = g.cache.write(i, kg, vg)  # (B, Hkv, L + T, D)
                o = F.scaled_dot_product_attention(qg, K, V, attn_mask=attend[j], scale=attn.scaling,
                                                   enable_gqa=H != Hkv)  # (B, H, T, D)
                outputs.append(o.transpose(1, 2).reshape(B * T, H * D))
            o = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (N, H·D)
            x = x + self.project(attn.o_proj, o, parts)  # (N, d)
            x = x + self._mlp(layer.mlp, layer.post_attention_layernorm(x), parts)  # (N, d)
        last, heads = [], []  # the positions whose logits are wanted, and their parts
        for g, start in spans:
            B, T = g.ids.shape
            rows = x[start:start + B * T]
            last.append(rows if g.every_position else rows.view(B, T, -1)[:, -1])
            heads.append(Part(B, B * T if g.every_position else B, g.routing))
        h = self.inner.norm(torch.cat(last))  # (M, d)
        # looked up now: loading an adapter on the head replaces the module (a LoRA wrapper around it)
        logits = self.project(self.model.get_output_embeddings(), h, heads)  # (M, vocab)
        results, start = [], 0
        for j, (g, part) in enumerate(zip(groups, heads)):
            B, T = g.ids.shape
            if g.cache is None:
                cache = BatchCache(fresh[j], T)
            else:
                cache = g.cache
                cache.advance(T)
            results.append((logits[start:start + part.tokens].view(B, part.tokens // B, -1), cache))
            start += part.tokens
        return results

    def _embed(self, g: Rows) -> torch.Tensor:
        """The embedding of `g`'s ids, (B, T, d), with the group's adapters where it has a routing."""
        embed = self.inner.embed_tokens
        if g.routing is not None and isinstance(embed, LoraLayer) and not embed.disabled:
            return g.routing.apply(embed, g.ids, embed.base(g.ids))
        return embed(g.ids)

    def _mlp(self, mlp: nn.Module, h: torch.Tensor, parts: list[Part]) -> torch.Tensor:
        """down(act(gate(h)) · up(h)): the gated MLP of these architectures, through `project`."""
        gated = mlp.act_fn(self.project(mlp.gate_proj, h, parts)) * self.project(mlp.up_proj, h, parts)
        return self.project(mlp.down_proj, gated, parts)


def _replaced_forward(module: nn.Module) -> bool:
    """A forward set on the instance (accelerate's offload hooks do that), other than lorakit's own lean
    MLP forward, which computes what the class's does."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "func", None) is not lean_forward


def transposed_faster(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether few-row products with plain Linear weights run as (W·xᵀ)ᵀ: in fp32 on a CPU without AVX-512.
    On an AVX2-only EPYC, MKL's x·Wᵀ at 4-64 rows ran 1.3-2.0x slower than (W·xᵀ)ᵀ on every layer shape of
    the embedded base (1.5-3.3x on its head); on a Zen 5 with AVX-512 the plain product was as fast or
    faster (BENCHMARKS.md); bf16 goes to oneDNN, plain. Decided by the CPU, not timed at startup: the two
    round differently (up to 4e-5 on the embedded base's products), and a timing that flips between server
    starts would change the answers."""
    return device.type == "cpu" and dtype == torch.float32 and "avx512f" not in cpu_info()[1]


def _projections(model: nn.Module) -> list[nn.Module]:
    """Every projection `Decoder.project` may take over, the output head last."""
    modules = []
    for layer in model.model.layers:
        modules += [getattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        modules += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    return [*modules, model.get_output_embeddings()]


def _transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b computed as (W·xᵀ)ᵀ: x (..., in), W (out, in) -> (..., out), contiguous."""
    xt = x.reshape(-1, x.shape[-1]).t()  # (in, N)
    # (out, N), then a transposed view; the bias added inside the product, rounded once as in F.linear
    y = (torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)).t()
    return y.contiguous().view(*x.shape[:-1], weight.shape[0])


def _attention_mask(mask: torch.Tensor, past: int, T: int) -> torch.Tensor | None:
    """(B, 1, T, past + T) booleans for T new tokens after `past` cached columns: a real column, and not
    after the token itself. None where that is every column (no padding, one new token).

    A padding position in a left-padded prompt has no real column before it; it attends to itself, so
    that its (unused) keys and values stay finite: a NaN there would reach real rows through the zero
    attention weights of masked columns (0·NaN = NaN)."""
    if T == 1 and bool(mask.all()):
        return None
    width = past + T
    columns = torch.arange(width, device=mask.device)  # (L + T,)
    own = past + torch.arange(T, device=mask.device)[:, None]  # (T, 1): each new token's own column
    allowed = mask.bool()[:, None, None, :] & (columns <= own)  # (B, 1, T, L + T)
    return allowed | (columns == own)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last axis's halves: RoPE's rotation in transformers' layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
