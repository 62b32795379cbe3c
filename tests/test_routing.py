"""Per-row adapters in a mixed batch (`lorakit.routing`): each row gets what its own mix gives alone."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, logits, perturb_trainables, randomize_adapters
from torch import nn

import lorakit
from lorakit.errors import UserError
from lorakit import routing as routing_module
from lorakit.routing import AdapterStacks, RowRouting

COST_RULE = routing_module._dense_is_cheaper  # as shipped (the fixture below replaces it in each test)

@pytest.fixture(autouse=True, params=["dense", "gathered"])
def path(request, monkeypatch):
    """Every test runs through both ways of applying per-row adapters (the cost rule picks one in use)."""
    monkeypatch.setattr(routing_module, "_dense_is_cheaper", lambda *args: request.param == "dense")
    return request.param


def _loop_reference(model: nn.Module, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Each row alone, with its adapter set (or adapters disabled)."""
    rows = []
    for row, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(model):
                rows.append(logits(model, ids[row:row + 1]))
        else:
            lorakit.set_adapters(model, name)
            rows.append(logits(model, ids[row:row + 1]))
    return torch.cat(rows)


@pytest.mark.parametrize("ranks", [(2, 5, 3), (4, 4, 4)])  # padded to the largest; stacked as they are
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gathered_per_row_equals_rows_alone(family, ranks):
    model = build(family)
    targets = ["q_proj", "v_proj", "o_proj"] if family == "llama" else ["c_attn", "c_proj"]
    for name, r in zip("abc", ranks):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=3 * r, target_modules=targets), adapter=name)
    randomize_adapters(model)
    ids = torch.randint(0, 97, (5, 9), generator=torch.Generator().manual_seed(3))
    names = ["b", None, "a", "b", "c"]
    with torch.no_grad(), lorakit.per_row_adapters(model, names):
        mixed = logits(model, ids)
    with torch.no_grad():
        expected = _loop_reference(model, ids, names)
    assert torch.allclose(mixed, expected, atol=1e-5)


def test_gathered_per_row_under_autograd_gives_adapter_gradients():
    model = build("llama")
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter=name)
    randomize_adapters(model)
    for _, layer in lorakit.lora_layers(model):
        for name in ("a", "b"):
            layer.lora_A[name].requires_grad_(True)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    reference = copy.deepcopy(model)
    with lorakit.per_row_adapters(model, ["a", "b"]):
        logits(model, ids).pow(2).sum().backward()
    # the same loss, one row at a time through the single-adapter path
    total = 0
    for row, name in enumerate(["a", "b"]):
        lorakit.set_adapters(reference, name)
        total = total + logits(reference, ids[row:row + 1]).pow(2).sum()
    total.backward()
    for (_, got), (_, want) in zip(lorakit.lora_layers(model), lorakit.lora_layers(reference)):
        for name in ("a", "b"):
            assert torch.allclose(got.lora_A[name].grad, want.lora_A[name].grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "embedding"])
def test_per_row_mixes_equal_each_mix_alone(family):
    """A row may mix adapters at weights ({name: w}); it gets what set_adapters gives that mix alone."""
    model = build("llama" if family == "embedding" else family)
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "embedding": ["embed_tokens", "q_proj"]}[family]
    for name, r in zip("abc", (2, 6, 3)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), adapter=name)
    randomize_adapters(model)
    ids = torch.randint(0, 97, (4, 7), generator=torch.Generator().manual_seed(5))
    rows = [{"a": 0.5, "b": 1.5}, None, "c", {"c": 0.25, "a": 1.0, "b": -1.0}]
    with torch.no_grad(), lorakit.per_row_adapters(model, rows):
        mixed = logits(model, ids)
    for row, spec in enumerate(rows):
        with torch.no_grad():
            if spec is None:
                with lorakit.disable_adapters(model):
                    alone = logits(model, ids[row:row + 1])
            else:
                lorakit.set_adapters(model, spec)
                alone = logits(model, ids[row:row + 1])
        assert torch.allclose(mixed[row], alone[0], atol=1e-5), (row, spec)


def test_per_row_stack_is_rebuilt_when_adapters_change():
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="a")
    randomize_adapters(model)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), lorakit.per_row_adapters(model, ["a"]):
        before = logits(model, ids)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["a"].mul_(3)  # in place: the cached stack must notice
        with lorakit.per_row_adapters(model, ["a"]):
            after = logits(model, ids)
        lorakit.set_adapters(model, "a")
        expected = logits(model, ids)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected, atol=1e-5)


def test_every_row_on_the_same_mix_equals_that_mix_alone(ids):
    """The uniform case (one mix's weights on every row, the same routing over many forwards) against set_adapters."""
    model = build("llama")
    for name, r in zip("abc", (2, 6, 3)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]), adapter=name)
    randomize_adapters(model)
    mix = {"a": 0.4, "b": -1.5, "c": 0.25}
    routing = RowRouting([mix] * ids.shape[0])
    with torch.no_grad():
        outs = []
        for _ in range(2):  # what the routing derives is made once and reused
            with lorakit.per_row_adapters(model, routing):
                outs.append(logits(model, ids))
        lorakit.set_adapters(model, mix)
        expected = logits(model, ids)
    assert torch.equal(outs[0], outs[1]) and torch.allclose(outs[0], expected, atol=1e-5)


def test_one_mix_on_every_row_is_folded_whatever_the_order_of_its_names(ids):
    """A server's clients all asking for one blend: its weights go into the concatenated B once."""
    model = build("llama")
    for name, r in zip("abc", (2, 6, 3)):
        config = lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
        lorakit.inject(model, config, adapter=name)
    randomize_adapters(model)
    mix = {"a": 0.4, "b": -1.5, "c": 0.25}
    rows = [mix, dict(reversed(mix.items())), mix]
    mixes = routing_module._restrict([routing_module._mix(i, spec) for i, spec in enumerate(rows)], {"a", "b", "c"})
    assert mixes.folded == (0.4, -1.5, 0.25)
    with torch.no_grad():
        with lorakit.per_row_adapters(model, rows):
            got = logits(model, ids)
        lorakit.set_adapters(model, mix)
        expected = logits(model, ids)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("weight", [3e38, -3e38])
def test_a_huge_weight_never_reaches_a_base_row(ids, weight):
    """One row's weight, large enough that w·s·B overflows fp32, leaves a base-only row beside it the
    base exactly (a folded B would have made its zero weights 0·inf = NaN)."""
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter="a")
    randomize_adapters(model)
    with torch.no_grad():
        with lorakit.per_row_adapters(model, [{"a": weight}, None, None]):
            got = logits(model, ids)
        with lorakit.disable_adapters(model):
            base = logits(model, ids)
    assert torch.equal(got[1:], base[1:])  # the same batch: the same products, and its LoRA terms exact zeros


def test_a_new_mix_per_request_keeps_the_folded_weights_bounded(ids, path):
    """Clients may send a new blend with every request: each is right, and a layer keeps at most 4 folded B."""
    model = build("llama")
    for name in "ab":
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter=name)
    randomize_adapters(model)
    stacks = AdapterStacks()
    layer = next(layer for _, layer in lorakit.lora_layers(model))
    with torch.no_grad():
        for i in range(1, 11):
            mix = {"a": 0.1 * i, "b": 1.0 - 0.05 * i}
            with lorakit.per_row_adapters(model, RowRouting([mix] * ids.shape[0], stacks=stacks)):
                got = logits(model, ids)
            lorakit.set_adapters(model, mix)
            assert torch.allclose(got, logits(model, ids), atol=1e-5), mix
    if path == "dense":
        (_, folded), = stacks._concatenated[layer][1].values()
        assert 1 <= len(folded) <= 4


@pytest.mark.parametrize("rows, folded", [
    (["a", "a"], None),  # one adapter at weight 1: nothing to fold, no weights to apply
    ([{"a": 2.0}, {"a": 2.0}], (2.0,)),
    ([{"a": 2.0}, None], None),  # a base row: its columns are weighed by 0, B keeps only s
    ([{"a": 2.0}, {"a": 2.0, "b": 1.0}], None),  # two mixes: each row weighs its own columns
    ([{"a": 0.5, "zzz": 3.0}, {"a": 0.5}], (0.5,)),  # an adapter this layer lacks drops out: one mix
    ([None, None], None),
])
def test_restrict_folds_only_one_mix_on_every_row(rows, folded):
    mixes = routing_module._restrict([routing_module._mix(i, spec) for i, spec in enumerate(rows)], {"a", "b"})
    assert mixes.folded == folded


def test_a_routing_first_used_under_inference_mode_still_trains(ids):
    """What a routing keeps (its rows' weights and gather indices) is made as ordinary tensors, so the same
    routing serves a forward with gradients after one under `torch.inference_mode`."""
    model = build("llama")
    for name in "ab":
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter=name)
    randomize_adapters(model)
    routing = RowRouting([{"a": 0.5, "b": 2.0}, None, "b"])
    with torch.inference_mode(), lorakit.per_row_adapters(model, routing):
        before = logits(model, ids)
    with lorakit.per_row_adapters(model, routing):
        out = logits(model, ids)
    out.pow(2).sum().backward()
    assert torch.allclose(out.detach(), before, atol=1e-6)
    layer = next(layer for _, layer in lorakit.lora_layers(model))
    assert layer.lora_B["b"].grad is not None and layer.lora_B["b"].grad.abs().sum() > 0


def test_a_routing_kept_across_an_adapter_replaced_by_another_kind_follows_the_new_one(ids):
    """Same name, now DoRA: what the routing knew about the layer's adapters is stale and rebuilt."""
    model = build("llama")
    for name in ("a", "b"):  # "b" stays, and so do the layers
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter=name)
    randomize_adapters(model)
    routing = RowRouting(["a"] * ids.shape[0])
    with torch.no_grad():
        with lorakit.per_row_adapters(model, routing):
            logits(model, ids)
        lorakit.delete_adapter(model, "a")
        lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["q_proj"], use_dora=True), adapter="a")
        perturb_trainables(model)
        with lorakit.per_row_adapters(model, routing):
            got = logits(model, ids)
        lorakit.set_adapters(model, "a")
        expected = logits(model, ids)
    assert torch.allclose(got, expected, atol=1e-5)


def test_per_row_adapters_equal_each_row_alone(ids):
    model = build("llama")
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + seed, target_modules=["q_proj", "v_proj"]), adapter=name)
    randomize_adapters(model)
    names = ["a", None, "b"]
    with lorakit.per_row_adapters(model, names):
        mixed = logits(model, ids)
    for row, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(model):
                alone = logits(model, ids[row:row + 1])
        else:
            lorakit.set_adapters(model, name)
            alone = logits(model, ids[row:row + 1])
        assert torch.allclose(mixed[row], alone[0], atol=1e-5), row


def test_one_routing_serves_many_forwards_and_shares_its_stacks():
    """As the server uses it: one RowRouting for many steps, one AdapterStacks for every routing."""
    model = build("llama")
    for name, r in (("a", 2), ("b", 3)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]), adapter=name)
    randomize_adapters(model)
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(7))
    stacks = AdapterStacks()
    routing = RowRouting(["b", {"a": 0.5, "b": 2.0}, None], stacks=stacks)
    layer = next(layer for _, layer in lorakit.lora_layers(model))
    with torch.no_grad():
        with lorakit.per_row_adapters(model, ["b", {"a": 0.5, "b": 2.0}, None]):
            fresh = logits(model, ids)
        outs = []
        for _ in range(2):
            with lorakit.per_row_adapters(model, routing):
                outs.append(logits(model, ids))
            first = stacks.get(layer)
        assert stacks.get(layer) is first  # built once, kept
        again = RowRouting([None, "a", "b"], stacks=stacks)
        with lorakit.per_row_adapters(model, again):
            logits(model, ids)
        assert stacks.get(layer) is first  # another batch's routing reuses the same stacks
    assert all(torch.equal(out, outs[0]) for out in outs) and torch.allclose(outs[0], fresh, atol=1e-6)
    assert layer.routing is None  # handed back when the block ends


@pytest.mark.parametrize("rows, message", [
    ([3], "row 0 of the per-row adapters is a int"),
    ([None, {"a": float("nan")}], "row 1: the weight of adapter 'a' must be a finite number"),
    ([{"a": True}], "must be a finite number"),
    ("a", "one entry per batch row"),
    ([{"nope": 0.0}], "no adapter named 'nope'"),  # named at weight 0 is still a mistake worth saying
])
def test_bad_rows_are_refused_in_one_line(rows, message):
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="a")
    with pytest.raises(UserError, match=message):
        with lorakit.per_row_adapters(model, rows):
            pass
    assert all(layer.routing is None for _, layer in lorakit.lora_layers(model))


def test_a_batch_of_another_size_is_an_error():
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="a")
    with pytest.raises(ValueError, match="name 2 rows but the batch has 3"):
        with torch.no_grad(), lorakit.per_row_adapters(model, ["a", None]):
            logits(model, torch.zeros(3, 4, dtype=torch.long))


def test_the_cost_rule_gathers_only_for_many_adapters_against_few_tokens():
    # (tokens, rows, k, padded rank, used rank): decode steps of 8 rows on one rank-8 adapter, on a mix of
    # four (ranks 8+16+8+4) and on the four spread over the rows; a prefill of 8 x 40 tokens on one adapter
    assert COST_RULE(8, 8, 1, 16, 8) and COST_RULE(8, 8, 4, 16, 36) and COST_RULE(8, 8, 1, 16, 36)
    assert COST_RULE(320, 8, 1, 16, 16)
    # many adapters against few tokens: a decode step of 32 rows, each its own rank-16 adapter; a prefill
    # of 8 x 40 tokens on 8 different ones
    assert not COST_RULE(32, 32, 1, 16, 512) and not COST_RULE(320, 8, 1, 16, 128)
