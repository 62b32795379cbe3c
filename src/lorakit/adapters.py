"""Putting adapters into a model and steering them: free functions over any `nn.Module`.

`inject` wraps the matched layers in place (a `LoraLayer` where the base layer was; a `SavedModule` for
modules_to_save, a `lorakit.tokens.TokenLayer` for trainable token rows) and freezes everything but the
new adapter. The configs of the adapters a model carries live in
`model.lorakit_configs` (name -> LoraConfig); everything else is found by walking the modules.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from lorakit import mlp
from lorakit.config import DEFAULT_TARGETS, LoraConfig
from lorakit.errors import UserError
from lorakit.layers import LoraLayer, SavedModule, base_kind, layer_dims
from lorakit.modules import matches, output_head, set_module, walk
from lorakit.nf4 import NF4Linear
from lorakit.routing import RowRouting, RowSpec
from lorakit.tokens import TokenLayer
from lorakit.tokens import plan as token_plan
from lorakit.variants import init as variant_init

ALL_LINEAR = "all-linear"
ALL_LINEAR_HEAD = "all-linear+head"  # every linear layer and the output head: `lorakit train`'s default
WRAPPERS = (LoraLayer, SavedModule, TokenLayer)  # what lorakit puts where a user's module was
# Wrappers around one leaf layer: nothing inside them is another wrapper, so walks looking for wrappers stop
# there. (A SavedModule may copy a whole block, LoRA layers of an earlier adapter included: walks enter it.)
LEAF_WRAPPERS = (LoraLayer, TokenLayer)


# -- finding things -------------------------------------------------------------------------------


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """name -> LoraConfig of every adapter the model carries (empty for a plain model)."""
    return model.__dict__.setdefault("lorakit_configs", {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(module path, layer) for every LoRA layer; the path is the base layer's original name."""
    for name, module in walk(model, stop=LEAF_WRAPPERS):
        if isinstance(module, LoraLayer):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[LoraLayer | SavedModule | TokenLayer]:
    for _, module in walk(model, stop=LEAF_WRAPPERS):
        if isinstance(module, WRAPPERS):
            yield module


def _held(wrapper: LoraLayer | SavedModule | TokenLayer):
    """The names of the adapters a wrapper holds weights of."""
    if isinstance(wrapper, LoraLayer):
        return wrapper.lora_A
    return wrapper.copies if isinstance(wrapper, SavedModule) else wrapper.indices


def _mergeable(model: nn.Module) -> Iterator[tuple[str, LoraLayer | TokenLayer]]:
    """(name, layer) for every wrapper a merge writes into the base weight of: LoRA layers and token rows."""
    for name, module in walk(model, stop=LEAF_WRAPPERS):
        if isinstance(module, (LoraLayer, TokenLayer)):
            yield name, module


def _base_modules(model: nn.Module, wrappers: list | None = None) -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the user's model had them: wrappers stand for their base, internals hidden.

    The wrappers passed on the way are appended to `wrappers` when given (one walk serves both).
    """
    for name, module in walk(model, stop=WRAPPERS):
        if isinstance(module, WRAPPERS):
            if wrappers is not None:
                wrappers.append(module)
            yield name, module.base
        else:
            yield name, module


# -- matching -------------------------------------------------------------------------------------


def _layer_index_ok(config: LoraConfig, key: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def resolve_targets(model: nn.Module, config: LoraConfig,
                    modules: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Full names of the modules `config` adapts in `model`; a clear error if there are none.

    `modules`: `list(_base_modules(model))` when the caller has it already.
    """
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise UserError("target_modules is not set and there is no default for this model; "
                            "pass target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
        targets = DEFAULT_TARGETS[model_type]
    modules = list(_base_modules(model)) if modules is None else modules
    if isinstance(targets, str) and targets.lower() in (ALL_LINEAR, ALL_LINEAR_HEAD):
        head = output_head(model)
        head = head.base if isinstance(head, WRAPPERS) else head  # as `modules` lists it
        with_head = targets.lower() == ALL_LINEAR_HEAD
        found = [n for n, m in modules if (base_kind(m) in ("linear", "conv1d") and m is not head)
                 or (with_head and m is head and base_kind(m) is not None)]
    else:
        found = [n for n, m in modules if n and matches(targets, n)]
        if not isinstance(targets, str):
            found = [n for n in found if _layer_index_ok(config, n)]
    if config.exclude_modules:
        found = [n for n in found if not matches(config.exclude_modules, n)]
    if config.modules_to_save:
        found = [n for n in found if not any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in config.modules_to_save)]
    kinds = dict(modules)
    unsupported = [n for n in found if base_kind(kinds[n]) is None]
    if unsupported:
        raise UserError(f"module {unsupported[0]!r} is a {type(kinds[unsupported[0]]).__name__}; "
                        "LoRA supports Linear, Conv1D and Embedding layers, so change target_modules")
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in modules if base_kind(m) is not None})
        raise UserError(f"target_modules={targets!r} matches no module; adaptable names here: {', '.join(leaves)}")
    return found


@dataclass
class Plan:
    """What `inject(model, config)` would do, found in one walk of the model; changes nothing.

    A loader checks a file against it and hands it to `inject`, so one load walks the model once for both.
    """

    modules: list[tuple[str, nn.Module]]  # (name, module) as the user's model has them: wrappers stand for their base
    wrappers: list[LoraLayer | SavedModule | TokenLayer]  # the wrappers already in the model
    targets: list[str]  # the modules that get a LoRA update
    saved: list[str]  # modules_to_save
    tokens: list[tuple[str, list[int], str | None]]  # `lorakit.tokens.plan`: token layers

    def layers(self) -> list[tuple[str, nn.Module]]:
        """(name, base layer) of every target."""
        kinds = dict(self.modules)
        return [(name, kinds[name]) for name in self.targets]


def plan_injection(model: nn.Module, config: LoraConfig) -> Plan:
    """The `Plan` of `inject(model, config)`, or the error it would raise about `config` and the model."""
    wrappers: list[LoraLayer | SavedModule | TokenLayer] = []
    modules = list(_base_modules(model, wrappers))  # the one walk
    if any(isinstance(w, LoraLayer) and w.merged for w in wrappers):
        raise UserError("the model has merged adapters; unmerge(model) before adding another")
    targets = resolve_targets(model, config, modules)
    saved = []
    for pattern in config.modules_to_save or []:
        hits = [n for n, _ in modules if n and matches([pattern], n)]
        if not hits:
            raise UserError(f"modules_to_save entry {pattern!r} matches no module in the model")
        saved += hits
    return Plan(modules, wrappers, targets, saved, planned_tokens(model, config, modules, targets))


def planned_tokens(model: nn.Module, config: LoraConfig, modules: list[tuple[str, nn.Module]] | None = None,
                   targets: list[str] | None = None) -> list[tuple[str, list[int], str | None]]:
    """`lorakit.tokens.plan` for `model`: (module, token ids, the module it shares rows with or None) of every
    token layer `inject(model, config)` would add; changes nothing. `modules` and `targets` when known."""
    if config.trainable_token_indices is None:  # most adapters: no walk of the model
        return []
    modules = list(_base_modules(model)) if modules is None else modules
    targets = resolve_targets(model, config, modules) if targets is None else targets
    saved = [n for n, _ in modules if n and matches(config.modules_to_save or [], n)]
    return token_plan(model, config, dict(modules), set(targets) | set(saved))


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[None]:
    """Inside the block, adapters may be added; if it raises, the model is put back exactly as it was:
    the new adapters' weights and wrappers removed, requires_grad, active sets, the lean MLP forwards
    and the config table restored."""
    if id(model) in _IN_TRANSACTION:  # the outer block puts everything back
        yield
        return
    configs = adapter_configs(model)
    saved_configs = dict(configs)
    modules = [m for _, m in walk(model, stop=LEAF_WRAPPERS)]  # one walk: this runs on every adapter load
    grads = [(p, p.requires_grad) for m in modules for p in _own_parameters(m)]
    wrappers = [m for m in modules if isinstance(m, WRAPPERS)]
    names = {n for w in wrappers for n in _held(w)}
    actives = [(w, dict(w.active)) for w in wrappers]
    lean = {id(m) for m in modules if "forward" in m.__dict__}
    _IN_TRANSACTION.add(id(model))
    try:
        yield
    except BaseException:
        added = {n for w in _wrappers(model) for n in _held(w)} - names
        for name in added:
            _remove(model, name)
        for module in model.modules():
            if id(module) not in lean:
                mlp.uninstall(module)
        configs.clear()
        configs.update(saved_configs)
        for p, flag in grads:
            p.requires_grad_(flag)
        for w, active in actives:
            w.active = active
        raise
    finally:
        _IN_TRANSACTION.discard(id(model))


_IN_TRANSACTION: set[int] = set()  # ids of the models inside a transaction (an inner one is the outer's part)


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """A module's own parameters, not its children's; a leaf wrapper's all, its base's and its adapters' (walks
    do not enter it). Without parameters()'s nested generators, which cost more than the rest of a load's walk."""
    inside = [module]
    if isinstance(module, LEAF_WRAPPERS):  # its base layer and adapter tables, which have no children as a rule
        for child in module._modules.values():
            inside += [m for _, m in walk(child)] if child._modules else [child]
    return [p for m in inside for p in m._parameters.values() if p is not None]


# -- inject / delete ------------------------------------------------------------------------------


def inject(model: nn.Module, config: LoraConfig, adapter: str = "default", initialize: bool = True,
           plan: Plan | None = None) -> nn.Module:
    """Wrap the layers `config` targets with a new adapter, freeze the rest, and make it the active one.

    Afterwards only the new adapter's parameters (plus biases per `config.bias`, copies of `modules_to_save`
    and rows of `trainable_token_indices`) have requires_grad. Returns the same model, changed in place.
    `initialize=False` leaves the new weights uninitialized, for a caller about to copy saved ones in.
    `plan`: `plan_injection(model, config)` when the caller has it (unchanged model and config since).
    """
    configs = adapter_configs(model)
    if adapter in configs:
        raise UserError(f"the model already has an adapter named {adapter!r}; pick another name or delete it")
    plan = plan_injection(model, config) if plan is None else plan  # the one walk before changing anything
    modules, targets, saved, tokens = plan.modules, plan.targets, plan.saved, plan.tokens
    if initialize:
        bases = dict(modules)
        variant_init.check(config, {name: bases[name] for name in targets},
                           _shared_weights(model) if variant_init.changes_base(config.init_lora_weights) else set())
    if isinstance(config.target_modules, str) and config.target_modules.lower() in (ALL_LINEAR, ALL_LINEAR_HEAD):
        # Record what "all-linear" meant here, as PEFT does, so the file says which layers it holds.
        config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in targets})
    if initialize:
        _check_size(config, targets, dict(modules))
    with transaction(model):  # on any failure, no half-added adapter
        for name in targets:
            layer = _wrap(model, name, LoraLayer)
            if layer.kind == "conv1d":
                config.fan_in_fan_out = True  # GPT-2's Conv1D stores (in, out); PEFT sets this too
            if config.lora_bias and layer.kind == "embedding":
                raise UserError(f"lora_bias is not supported on the embedding {name!r} (as in PEFT); "
                                "leave it out of target_modules or set lora_bias=False")
            layer.add_adapter(adapter, r=config.rank_for(name), scaling=config.scaling_for(name),
                              dropout=config.lora_dropout, init=config.init_lora_weights if initialize else None,
                              use_dora=config.use_dora, lora_bias=config.lora_bias)
        for name in saved:
            _wrap(model, name, SavedModule).add_adapter(adapter)
        for name, ids, shared in tokens:  # a tied head after its embedding, whose rows it takes
            values = model.get_submodule(shared).values[adapter] if shared else None
            _wrap(model, name, TokenLayer).add_adapter(adapter, ids, values, initialize=initialize)
        for _, module in modules:
            if "down_proj" in module._modules:  # a gated MLP keeps less for the backward (see lorakit.mlp)
                mlp.install(module)
        configs[adapter] = config
        for module in mark_trainable(model, adapter):
            module.active = {adapter: 1.0}  # what set_adapters(model, adapter) does, without another walk
    return model


def _check_size(config: LoraConfig, targets: list[str], modules: dict[str, nn.Module]) -> None:
    """A new adapter may not hold more numbers than the layers it adapts (a rank beyond that is a typo, and
    r=10**9 would try to allocate terabytes): refused before anything is allocated."""
    adapter = layers = 0
    for name in targets:
        inputs, outputs = layer_dims(modules[name])
        adapter += config.rank_for(name) * (inputs + outputs)
        layers += inputs * outputs
    if adapter > layers:
        raise UserError(f"r={config.r} gives an adapter of {adapter:,} parameters, more than the {layers:,} of the "
                        "layers it adapts (a full update of them would be smaller); lower r")


def _wrap(model: nn.Module, name: str, kind: type) -> LoraLayer | SavedModule | TokenLayer:
    module = model.get_submodule(name)
    if isinstance(module, kind):
        return module
    if isinstance(module, WRAPPERS):
        raise UserError(f"module {name!r} would get two kinds of adapter (of LoRA, modules_to_save and "
                        "trainable_token_indices, one module takes one); choose one")
    wrapper = kind(module).train(module.training)
    set_module(model, name, wrapper)
    return wrapper


def mark_trainable(model: nn.Module, adapter: str | None) -> list[LoraLayer | SavedModule | TokenLayer]:
    """requires_grad only on `adapter`'s parameters (and biases per its config); None freezes all.

    Returns the model's wrappers (found on the way).
    """
    wrappers = []
    for _, module in walk(model, stop=LEAF_WRAPPERS):  # one walk: freeze each module's parameters, note the wrappers
        for p in _own_parameters(module):
            p.requires_grad_(False)
        if isinstance(module, WRAPPERS):
            wrappers.append(module)
    if adapter is None:
        return wrappers
    config = adapter_configs(model)[adapter]
    for module in wrappers:
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            for table in (module.lora_A, module.lora_B, module.lora_magnitude, module.lora_bias):
                if adapter in table:
                    table[adapter].requires_grad_(True)
            if config.bias == "lora_only" and getattr(module.base, "bias", None) is not None:
                module.base.bias.requires_grad_(True)
        elif isinstance(module, SavedModule) and adapter in module.copies:
            module.copies[adapter].requires_grad_(True)
        elif isinstance(module, TokenLayer) and adapter in module.values:
            module.values[adapter].requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".lora_" not in name:
                p.requires_grad_(True)
    return wrappers


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove an adapter's weights from every layer; layers left without adapters become plain again."""
    configs = adapter_configs(model)
    if adapter not in configs:
        raise UserError(f"no adapter named {adapter!r}; the model has {sorted(configs) or 'none'}")
    _remove(model, adapter)
    del configs[adapter]


def _remove(model: nn.Module, adapter: str) -> None:
    """Take `adapter`'s weights out of every wrapper; wrappers left empty give back their base."""
    for name, module in list(walk(model, stop=LEAF_WRAPPERS)):
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if adapter in module.merged:
                raise UserError(f"adapter {adapter!r} is merged; unmerge(model) before deleting it")
            module.delete_adapter(adapter)
            if not module.lora_A:
                set_module(model, name, module.base)
        elif isinstance(module, (SavedModule, TokenLayer)) and adapter in _held(module):
            if adapter in getattr(module, "merged", {}):
                raise UserError(f"adapter {adapter!r} is merged; unmerge(model) before deleting it")
            module.delete_adapter(adapter)
            if not _held(module):
                set_module(model, name, module.base)


# -- which adapters run ---------------------------------------------------------------------------


def set_adapters(model: nn.Module, adapters: str | list[str] | dict[str, float]) -> None:
    """Choose the active adapters: a name, a list (weight 1 each) or {name: weight}."""
    if isinstance(adapters, str):
        adapters = {adapters: 1.0}
    elif not isinstance(adapters, dict):
        adapters = {name: 1.0 for name in adapters}
    known = adapter_configs(model)
    for name, weight in adapters.items():
        if name not in known:
            raise UserError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight:
            raise UserError(f"weight for adapter {name!r} must be a number, got {weight!r}")
    wrappers = list(_wrappers(model))
    for module in wrappers:
        if isinstance(module, (LoraLayer, TokenLayer)) and module.merged and dict(module.active) != adapters:
            raise UserError("adapters are merged into the base; unmerge(model) before changing the active set")
    for module in wrappers:
        module.active = {n: float(w) for n, w in adapters.items()}


def active_adapters(model: nn.Module) -> dict[str, float]:
    for module in _wrappers(model):
        return dict(module.active)
    return {}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is exactly its base (merged adapters are taken out, then put back)."""
    was_merged = any(layer.merged for _, layer in _mergeable(model))
    if was_merged:
        unmerge(model)
    wrappers = list(_wrappers(model))
    for module in wrappers:
        module.disabled = True
    try:
        yield model
    finally:
        for module in wrappers:
            module.disabled = False
        if was_merged:
            merge(model)


@contextlib.contextmanager
def per_row_adapters(model: nn.Module, rows: list[RowSpec] | RowRouting) -> Iterator[nn.Module]:
    """Inside the block, batch row i uses its own adapters: rows[i] is a name (weight 1), a
    {name: weight} mix, or None (the base alone).

    For a mixed batch of requests for different adapters in one forward pass. `rows` may be a
    `lorakit.routing.RowRouting` made once and handed over for many forwards (a server's decode
    steps): it keeps the stacked weights and gather indices between them.
    """
    routing = rows if isinstance(rows, RowRouting) else RowRouting(rows)
    with routed(check_row_adapters(model, routing), routing):
        yield model


@contextlib.contextmanager
def routed(layers: list[LoraLayer], routing: RowRouting) -> Iterator[None]:
    """`per_row_adapters` without its checks: `layers` are `check_row_adapters(model, routing)`'s, found
    by a caller that knows the model has not changed since (a server between two adapter jobs)."""
    for layer in layers:
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None


def check_row_adapters(model: nn.Module, routing: RowRouting) -> list[LoraLayer]:
    """The model's LoRA layers, once `routing` is known to be one they can apply (its adapters exist,
    unmerged, without trainable token rows); a UserError says what is wrong otherwise."""
    known = adapter_configs(model)
    for name in routing.adapters():
        if name not in known:
            raise UserError(f"no adapter named {name!r}; the model has {sorted(known) or 'none'}")
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise UserError("per-row adapters need unmerged weights; unmerge(model) first")
    rows = [name for module in _wrappers(model) if isinstance(module, TokenLayer) for name in module.indices
            if name in routing.adapters()]
    if rows:  # a TokenLayer replaces rows for the whole batch; routing them per row is not built
        raise UserError(f"adapter {rows[0]!r} has trainable token rows, which per-row adapters do not route; "
                        "serve it alone (set_adapters) or merge it into its own copy of the base")
    return layers


# -- merge / unload -------------------------------------------------------------------------------


def merge(model: nn.Module) -> None:
    """Fold the active adapters (at their weights) into the base weights: zero-overhead inference."""
    _merge(model)


def _merge(model: nn.Module) -> None:
    for name, layer in _mergeable(model):
        try:
            layer.check_mergeable()
        except UserError as err:
            raise UserError(f"{name}: {err}") from None
    # A layer whose weight another module shares (an output head tied to the input embedding) gets a
    # weight of its own: the adapter changes what that layer computes, not the other module. The model
    # is then untied, and says so in its config (save_pretrained writes both weights); unmerge ties back.
    tied = set(_tied_lora_weights(model))
    merged = []
    try:
        for name, layer in _mergeable(model):
            if not layer.merged:
                merged.append(layer)
                if name in tied:
                    layer.untie()
                    _set_tied(model, False)
            layer.merge()
    except BaseException:  # leave the model as it was (a DoRA adapter can refuse a layer)
        for layer in merged:
            layer.unmerge()
        _retie(model)
        raise


def unmerge(model: nn.Module) -> None:
    """Take merged adapters out of the base weights again."""
    for _, layer in _mergeable(model):
        layer.unmerge()
    _retie(model)


def _retie(model: nn.Module) -> None:
    """Tie back what `_merge` untied and did not merge (it failed), and the config once nothing is untied."""
    layers = [layer for _, layer in _mergeable(model)]
    for layer in layers:
        if layer.untied_from and not layer.merged:
            layer.base.weight = layer.untied_from.pop()
    if model.__dict__.get("lorakit_untied") and not any(layer.untied_from for layer in layers):
        _set_tied(model, True)


def _set_tied(model: nn.Module, tied: bool) -> None:
    """Untie: tie_word_embeddings False in the model's config (and its text config), remembering the values
    it had; tie back: those values (a model tied by hand under a config that says untied stays so)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    if tied:
        for c, value in model.__dict__.pop("lorakit_untied", []):
            c.tie_word_embeddings = value
        return
    configs = {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values()
    untied = model.__dict__.setdefault("lorakit_untied", [(c, c.tie_word_embeddings) for c in configs
                                                          if hasattr(c, "tie_word_embeddings")])
    for c, _ in untied:
        c.tie_word_embeddings = False


def _owners(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many modules hold it (more than one: tied)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return owners


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds (an output head tied to the input embedding)."""
    return {p for p, n in _owners(model).items() if n > 1}


def _tied_lora_weights(model: nn.Module) -> list[str]:
    shared = _shared_weights(model)
    return [name for name, layer in _mergeable(model)
            if layer.running() and id(layer.base.weight) in shared]  # one a merge writes into


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every lorakit module; with merge=True the active adapters are folded in first.

    The result is the plain model (e.g. a transformers model ready for `save_pretrained`).
    """
    if merge:
        _merge(model)
    else:
        unmerge(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoraLayer, TokenLayer)):
            set_module(model, name, module.base)
        elif isinstance(module, SavedModule):
            set_module(model, name, module.current() if merge else module.base)
        else:
            mlp.uninstall(module)
    model.__dict__.pop("lorakit_configs", None)
    model.__dict__.pop("lorakit_untied", None)
    return model


# -- counting -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
                f"|| trainable%: {self.percent:.4f}")


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """How many parameters train (requires_grad) out of all of them, each tensor counted once.

    An NF4 weight (a buffer, not a parameter) counts its elements, as PEFT counts 4-bit weights.
    """
    params = {id(p): p for p in model.parameters()}.values()
    frozen_nf4 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params) + frozen_nf4)
