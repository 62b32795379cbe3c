"""Adapter algebra: a new adapter from a weighted combination of others, in PEFT's format.

Every method works module by module on the update each adapter adds to the base weight,

    ΔW = s·B·A        B (out, r), A (r, in), s = alpha/r (or alpha/sqrt(r) with rslora)

in the orientation of the file (for Conv1D and Embedding the base weight is the transpose, which
the algebra never needs). `linear` and `cat` are exact because they stack ranks:

    Σ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | … | wₙsₙBₙ] · [A₁; …; Aₙ]

so the result's ΔW is the weighted sum to float rounding. (PEFT's `add_weighted_adapter("linear")`
mixes the A's and the B's separately, and the product picks up cross terms Bᵢ·Aⱼ.) The other methods
change ΔW entry by entry (TIES, DARE, magnitude pruning) or truncate it (svd), and return to low
rank by SVD; the relative error of that return is kept in `Adapter.error`. A module that one adapter
lacks counts as zero there. The result is written in fp32 with scale 1 on every module.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.errors import UserError
from lorakit.files import check_output
from lorakit.io import (EMBEDDING_COPY, EMBEDDING_FACTORS, FACTOR_SUFFIXES, PREFIX, factor_keys, parse_adapter_spec,
                        portable_adapter, read_adapter, write_adapter)
from lorakit.options import add_command, default_of, option

METHODS: dict[str, str] = {
    "linear": "Σ wᵢ·ΔWᵢ exactly, ranks stacked; --rank R compresses it by truncated SVD",
    "cat": "rank concatenation: the same exact sum, never compressed (PEFT's name for it)",
    "svd": "Σ wᵢ·ΔWᵢ truncated to --rank R by SVD (default: the largest input rank)",
    "ties": "TIES: trim each ΔWᵢ to --density, elect a sign per entry, mean of the agreeing entries",
    "dare_linear": "DARE: drop entries at random (keep --density, rescale by 1/density), then sum",
    "dare_ties": "DARE's random drop, then TIES' sign election and disjoint mean",
    "magnitude_prune": "trim each ΔWᵢ to --density by magnitude, then sum",
}
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class Factors:
    """One module's update ΔW = scale·B·A."""

    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    scale: float
    embedding: bool  # stored as lora_embedding_A / _B

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        return (self.B.float() @ self.A.float()) * self.scale  # (out, in)


@dataclass
class Adapter:
    """An adapter in memory: its config and PEFT-keyed tensors, as `read_adapter` returns them."""

    config: LoraConfig
    tensors: dict[str, Tensor]
    name: str = "adapter"
    """How messages refer to it (the directory it came from)."""
    error: dict[str, float] = field(default_factory=dict)
    """For a result of `combine`: ‖ΔW − s·B·A‖_F / ‖ΔW‖_F per module that was returned to low rank."""

    @classmethod
    def load(cls, directory: str | Path) -> Adapter:
        config, tensors = read_adapter(directory)
        return cls(config, tensors, name=str(directory))

    @classmethod
    def from_model(cls, model: torch.nn.Module, adapter: str = "default") -> Adapter:
        """A copy of adapter `adapter` of a model that carries it (e.g. one just trained)."""
        config, tensors = portable_adapter(model, adapter)  # for the original base (PiSSA / OLoRA converted)
        return cls(copy.deepcopy(config), {k: v.detach().clone() for k, v in tensors.items()}, name=adapter)

    def save(self, directory: str | Path) -> Path:
        return write_adapter(directory, self.config, self.tensors)

    def modules(self) -> dict[str, Factors]:
        """module path -> its factors, for every module the adapter changes."""
        out: dict[str, Factors] = {}
        for key, A in self.tensors.items():
            for a_suffix, b_suffix in FACTOR_SUFFIXES.items():
                if not key.endswith(a_suffix):
                    continue
                path = key.removeprefix(PREFIX)[: -len(a_suffix)]
                B = self.tensors.get(key[: -len(a_suffix)] + b_suffix)
                if B is None or B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
                    raise UserError(f"{self.name}: module {path!r} lacks a matching {b_suffix[1:]}; "
                                    "the adapter is incomplete, re-save it")
                out[path] = Factors(A, B, self.config.scaling_for(path), a_suffix == EMBEDDING_FACTORS[0])
        return out

    def require_plain(self, purpose: str) -> None:
        """UserError unless every module's update is ΔW = s·B·A (no DoRA magnitude, no lora_bias); `purpose`
        says what needs that and what to do instead."""
        if self.config.use_dora:
            raise UserError(f"{self.name} is a DoRA adapter: its magnitude rescales each row of the whole weight "
                            f"W + s·B·A, so its change is not a low-rank ΔW; {purpose}")
        if self.config.lora_bias:
            raise UserError(f"{self.name} trains a bias beside B (lora_bias), which is not a low-rank ΔW; {purpose}")

    def extras(self) -> dict[str, Tensor]:
        """Tensors that are not LoRA factors (biases, modules_to_save, PEFT's embedding copies)."""
        factor_suffixes = (*FACTOR_SUFFIXES, *FACTOR_SUFFIXES.values())
        return {k: v for k, v in self.tensors.items() if not k.endswith(factor_suffixes)}


AdapterLike = Adapter | str | Path


def combine(adapters: Sequence[AdapterLike | tuple[AdapterLike, float]], method: str = "linear",
            rank: int | None = None, density: float | None = None, seed: int = 0) -> Adapter:
    """A new adapter mixing `adapters` (each an Adapter, a directory, "dir:weight" or (adapter, weight)).

    `rank` caps the result's rank (compressing by truncated SVD); `density` is the fraction of
    entries TIES / DARE / magnitude pruning keep; `seed` fixes DARE's random drop.
    """
    _check_options(method, rank, density, seed)
    weighted = [_weighted(item) for item in adapters]
    if not weighted:
        raise UserError("combine needs at least one adapter, e.g. combine(['a:0.5', 'b:0.5'])")
    for adapter, _ in weighted:  # a weighted sum of DoRA adapters is not a DoRA adapter (nor is any mix with one)
        adapter.require_plain("combine sums low-rank updates and cannot mix it (a weighted sum of DoRA adapters is "
                              "not a DoRA adapter); apply adapters together instead (set_adapters, repeated --adapter) "
                              "or merge them into the base (lorakit merge)")
    tables = [(adapter.modules(), weight) for adapter, weight in weighted]
    _check_same_base(weighted, [table for table, _ in tables])

    results: dict[str, Factors] = {}
    errors: dict[str, float] = {}
    for path in dict.fromkeys(p for table, _ in tables for p in table):
        parts = [(table[path], weight) for table, weight in tables if path in table]
        results[path], error = _combine_module(path, parts, method, rank, density, seed)
        if error is not None:
            errors[path] = error

    sources = [adapter for adapter, _ in weighted]
    config = _result_config(sources, {p: f.rank for p, f in results.items()})
    tensors = _shared_extras(sources)
    for path, f in results.items():
        a_key, b_key = factor_keys(path, f.embedding)
        tensors[a_key] = f.A.float().contiguous()
        tensors[b_key] = (f.B.float() * f.scale).contiguous()  # scale 1 in the config
    name = f"{method} of " + " + ".join(f"{w:g}×{a.name}" for a, w in weighted)
    return Adapter(config, tensors, name=name, error=errors)


# -- one module -----------------------------------------------------------------------------------


def _combine_module(path: str, parts: list[tuple[Factors, float]], method: str, rank: int | None,
                    density: float | None, seed: int) -> tuple[Factors, float | None]:
    stacked = _stack(parts)
    if method in ("linear", "cat"):
        if rank is None or rank >= stacked.rank:
            return stacked, None
        return truncate(stacked, rank)
    if method == "svd":
        return truncate(stacked, rank or max(f.rank for f, _ in parts))
    generators = [torch.Generator().manual_seed(_module_seed(seed, path, i)) for i in range(len(parts))]
    delta = MERGES[method]([f.delta() for f, _ in parts], [w for _, w in parts], density, generators)
    return factorize(delta, rank or stacked.rank, stacked.embedding)


def _stack(parts: list[tuple[Factors, float]]) -> Factors:
    """The exact weighted sum as one adapter of rank Σ rᵢ and scale 1."""
    A = torch.cat([f.A.float() for f, _ in parts], dim=0)  # (Σr, in)
    B = torch.cat([f.B.float() * (w * f.scale) for f, w in parts], dim=1)  # (out, Σr)
    return Factors(A, B, 1.0, parts[0][0].embedding)


def truncate(f: Factors, rank: int) -> tuple[Factors, float]:
    """Best rank-`rank` approximation of s·B·A, without forming the (out, in) matrix.

    With B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ, so the SVD of the
    small core gives the SVD of ΔW. Returns the factors and the relative Frobenius error.
    """
    U, S, Vh = low_rank_svd(f)
    return _from_svd(U, S, Vh, rank, f.embedding)


def low_rank_svd(f: Factors) -> tuple[Tensor, Tensor, Tensor]:
    """U (out, k), S (k,), Vh (k, in) of s·B·A in fp64, k ≤ r, from QRs of the factors."""
    Q_b, R_b = torch.linalg.qr(f.B.double())  # (out, k), (k, r)
    Q_a, R_a = torch.linalg.qr(f.A.double().t())  # (in, k'), (k', r)
    U, S, Vh = torch.linalg.svd(f.scale * R_b @ R_a.t(), full_matrices=False)  # core (k, k')
    return Q_b @ U, S, Vh @ Q_a.t()


def factorize(delta: Tensor, rank: int, embedding: bool) -> tuple[Factors, float]:
    """Best rank-`rank` factors of a full ΔW (out, in) and the relative Frobenius error."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    return _from_svd(U, S, Vh, rank, embedding)


def _from_svd(U: Tensor, S: Tensor, Vh: Tensor, rank: int, embedding: bool) -> tuple[Factors, float]:
    keep = min(rank, S.shape[0])
    root = S[:keep].sqrt()  # split σ evenly so A and B have the same scale
    B = (U[:, :keep] * root).float()  # (out, R)
    A = (root[:, None] * Vh[:keep]).float()  # (R, in)
    total = float(S.double().square().sum())
    # Eckart–Young: the Frobenius error of the truncation is the norm of the dropped singular values.
    error = math.sqrt(float(S[keep:].double().square().sum()) / total) if total > 0 else 0.0
    return Factors(A, B, 1.0, embedding), error


def _module_seed(seed: int, path: str, index: int) -> int:
    """A seed per module and input: a module's result does not depend on which other modules exist."""
    return zlib.crc32(f"{seed}/{path}/{index}".encode())


# -- entry-wise merge rules on full ΔW (TIES, DARE, magnitude pruning) ----------------------------
# Each takes the full updates ΔWᵢ (out, in), the weights wᵢ, the density and one generator per input.


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the int(density·numel) entries of largest magnitude, zero the rest (TIES' trim step)."""
    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[delta.abs().flatten().topk(keep).indices] = True
    return delta * mask.view(delta.shape)


def drop(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability density and divide by it, so the expectation is ΔW."""
    keep = torch.bernoulli(torch.full(delta.shape, density), generator=generator)
    return delta * keep / density


def elect_and_mean(tensors: list[Tensor]) -> Tensor:
    """TIES' sign election and disjoint mean over weighted updates τᵢ.

    The sign of each entry is that of Σ τᵢ (ties go to +); the result is the mean of the τᵢ that
    have that sign there (zeros never count). Unlike PEFT, the election sees the weighted τᵢ, so a
    negative weight subtracts an adapter instead of being outvoted by its own unweighted sign.
    """
    stacked = torch.stack(tensors)  # (n, out, in)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)  # (out, in)
    agree = stacked.sign() == sign  # (n, out, in)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def _ties(deltas, weights, density, generators):
    return elect_and_mean([w * trim(d, density) for d, w in zip(deltas, weights, strict=True)])


def _dare_linear(deltas, weights, density, generators):
    return sum(w * drop(d, density, g) for d, w, g in zip(deltas, weights, generators, strict=True))


def _dare_ties(deltas, weights, density, generators):
    return elect_and_mean([w * drop(d, density, g) for d, w, g in zip(deltas, weights, generators, strict=True)])


def _magnitude_prune(deltas, weights, density, generators):
    return sum(w * trim(d, density) for d, w in zip(deltas, weights, strict=True))


MERGES = {"ties": _ties, "dare_linear": _dare_linear, "dare_ties": _dare_ties, "magnitude_prune": _magnitude_prune}


# -- checks ---------------------------------------------------------------------------------------


def _check_options(method: str, rank: int | None, density: float | None, seed: int) -> None:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise UserError(f"rank must be a positive integer, got {rank!r}")
    if method == "cat" and rank is not None:
        raise UserError("cat keeps every rank; to compress, use method linear with a rank")
    if method in DENSITY_METHODS:
        if density is None:
            raise UserError(f"method {method} needs a density in (0, 1], the fraction of entries to keep, e.g. 0.5")
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < density <= 1.0:
            raise UserError(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise UserError(f"density applies to {', '.join(DENSITY_METHODS)}, not to {method}; leave it out")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise UserError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")


def _weighted(item: AdapterLike | tuple[AdapterLike, float]) -> tuple[Adapter, float]:
    if isinstance(item, tuple):
        source, weight = item
    elif isinstance(item, str):
        source, weight = parse_adapter_spec(item)
    else:
        source, weight = item, 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UserError(f"the weight of {source} must be a finite number, got {weight!r}")
    if isinstance(source, (str, Path)):
        return Adapter.load(source), float(weight)
    if isinstance(source, Adapter):
        return source, float(weight)
    raise UserError(f"combine takes adapters as directories or lorakit.algebra.Adapter, got {type(source).__name__}")


def _same_base(x: str, y: str) -> bool:
    if x == y:
        return True
    px, py = Path(x).expanduser(), Path(y).expanduser()
    return px.exists() and py.exists() and px.resolve() == py.resolve()


def _check_same_base(weighted: list[tuple[Adapter, float]], tables: list[dict[str, Factors]]) -> None:
    named = [(a.name, a.config.base_model_name_or_path) for a, _ in weighted if a.config.base_model_name_or_path]
    for name, base in named[1:]:
        if not _same_base(named[0][1], base):
            raise UserError(f"{named[0][0]} is for base {named[0][1]!r} but {name} is for base {base!r}; "
                            "combine adapters of one base model")
    seen: dict[str, tuple[tuple[int, int, bool], str]] = {}
    for (adapter, _), table in zip(weighted, tables, strict=True):
        for path, f in table.items():
            shape = (f.A.shape[1], f.B.shape[0], f.embedding)
            first = seen.setdefault(path, (shape, adapter.name))
            if first[0] != shape:
                raise UserError(f"module {path!r} maps {first[0][0]} -> {first[0][1]} in {first[1]} but "
                                f"{shape[0]} -> {shape[1]} in {adapter.name}: the adapters are for different "
                                "bases; combine adapters of one base model")


def _shared_extras(sources: list[Adapter]) -> dict[str, Tensor]:
    """Pass on PEFT's saved copies of base embeddings (equal in all inputs); refuse trained extras."""
    shared: dict[str, Tensor] = {}
    for adapter in sources:
        for key, tensor in adapter.extras().items():
            if not key.endswith(EMBEDDING_COPY):
                raise UserError(f"{adapter.name} also trains {key.removeprefix(PREFIX)} (bias, modules_to_save or token "
                                "rows); combine mixes LoRA updates only, so re-train it with bias='none', no "
                                "modules_to_save and no trainable_token_indices")
            if key in shared and not torch.equal(shared[key], tensor):
                raise UserError(f"{adapter.name} holds a different {key.removeprefix(PREFIX)} than another input; "
                                "the adapters are for different bases (or resized vocabularies)")
            shared[key] = tensor
    return shared


# -- the result's config --------------------------------------------------------------------------


def _result_config(sources: list[Adapter], ranks: dict[str, int]) -> LoraConfig:
    """Rank per module as computed and alpha = rank (scale 1) everywhere, via rank/alpha patterns."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    odd = {path: k for path, k in ranks.items() if k != r}
    first = sources[0].config
    targeting = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
    same_modules = all(set(a.modules()) == set(ranks) for a in sources)
    same_targeting = all(getattr(a.config, t) == getattr(first, t) for a in sources for t in targeting)
    if same_modules and same_targeting:
        targets = {t: getattr(first, t) for t in targeting}
    else:  # the union of the inputs' modules, named exactly (PEFT matches list entries exactly)
        targets = {"target_modules": sorted(ranks), "layers_to_transform": None, "layers_pattern": None,
                   "exclude_modules": None}
    config = LoraConfig(
        r=r, lora_alpha=r, rank_pattern=odd, alpha_pattern=dict(odd), use_rslora=False,
        lora_dropout=first.lora_dropout, bias="none", modules_to_save=None,
        fan_in_fan_out=any(a.config.fan_in_fan_out for a in sources),
        base_model_name_or_path=next((a.config.base_model_name_or_path for a in sources
                                      if a.config.base_model_name_or_path), None),
        extra=dict(first.extra), **targets,
    )
    for path, k in ranks.items():  # full paths are regexes to PEFT; make sure each picks its own entry
        if config.rank_for(path) != k or config.scaling_for(path) != 1.0:
            raise RuntimeError(f"rank_pattern does not resolve {path!r} to rank {k}; please report this")
    return config


# -- command --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class CombineConfig:
    """Everything `lorakit combine` takes; each field's help is its --help (defaults: `combine`'s)."""

    adapters: list[str] = option("adapter directories, each with an optional weight (default 1; negative subtracts)",
                                 positional=True, metavar="ADAPTER[:WEIGHT]")
    method: str = option("how to combine, see above", default=default_of(combine, "method"))
    out: Path = option("directory to write the new adapter to")
    rank: int | None = option("rank of the result; compresses by truncated SVD and prints the error it costs",
                              default=default_of(combine, "rank"))
    density: float | None = option("fraction of entries kept, in (0, 1], for ties, dare_* and magnitude_prune",
                                   default=default_of(combine, "density"))
    seed: int = option("seed of DARE's random drop", default=default_of(combine, "seed"))
    overwrite: bool = option("replace an adapter already in --out", default=False)


def cmd_combine(config: CombineConfig) -> Adapter:
    """`lorakit combine`: `combine`, saved, and what it cost."""
    out = Path(config.out)
    if (out / CONFIG_NAME).exists() and not config.overwrite:
        raise UserError(f"{out} already holds an adapter; pass --overwrite or choose another --out")
    check_output(out, "--out", directory=True)
    result = combine(config.adapters, method=config.method, rank=config.rank, density=config.density, seed=config.seed)
    result.save(out)
    ranks = [f.rank for f in result.modules().values()]
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    spread = f"rank {ranks[0]}" if len(set(ranks)) == 1 else f"ranks {min(ranks)}-{max(ranks)}"
    print(f"wrote {out}: {result.name}; {len(ranks)} modules, {spread}, {size / 1e6:.2f} MB")
    print(error_summary(result.error))
    return result


def error_summary(errors: dict[str, float]) -> str:
    """One line on what returning to low rank cost (no errors recorded: the result is exact)."""
    if not errors:
        return "exact: every module's ΔW is the weighted sum Σ wᵢ·ΔWᵢ (to float rounding)"
    worst = max(errors, key=errors.get)
    mean = sum(errors.values()) / len(errors)
    return (f"return to low rank by SVD: relative error ‖ΔW − B·A‖/‖ΔW‖ max {errors[worst]:.3g} ({worst}), "
            f"mean {mean:.3g} over {len(errors)} modules")


def register(subparsers) -> None:
    methods = "\n".join(f"  {name:<16} {text}" for name, text in METHODS.items())
    add_command(subparsers, "combine", "mix adapters into one new adapter: exact weighted sum, TIES, DARE, SVD",
                "Mix adapters (PEFT format) into one new adapter, written in PEFT format.\n\n"
                f"methods:\n{methods}\n\nexamples:\n"
                "  lorakit combine adapters/legal:0.7 adapters/poetry:0.3 --out adapters/mix\n"
                "  lorakit combine a b --method ties --density 0.5 --rank 8 --out adapters/ties",
                cmd_combine, CombineConfig)
