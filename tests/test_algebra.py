"""Adapter algebra: exact sums against explicit math and PEFT, merge rules on hand-computed cases, errors."""

from __future__ import annotations

import argparse
import copy

import peft
import pytest
import torch
from conftest import build, logits, randomize_adapters

import lorakit
import lorakit.cli
from lorakit import algebra
from lorakit.algebra import Adapter, Factors, combine
from lorakit.io import PREFIX

# name -> (family, [(LoraConfig kwargs, weight), ...]): mixed ranks, alphas, rslora, patterns,
# target sets that only partly overlap, embeddings, and GPT-2's transposed Conv1D.
MIXES = {
    "mixed ranks and targets": ("llama", [
        (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 0.7),
        (dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj"]), -0.4),
    ]),
    "patterns, embedding, three adapters": ("llama", [
        (dict(r=3, lora_alpha=6, target_modules=["q_proj", "embed_tokens"], rank_pattern={"layers.1.self_attn.q_proj": 5},
              alpha_pattern={"embed_tokens": 2}), 1.0),
        (dict(r=2, lora_alpha=2, target_modules=["v_proj", "embed_tokens"]), 0.5),
        (dict(r=6, lora_alpha=3, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers"), 2.0),
    ]),
    "gpt2 conv1d": ("gpt2", [
        (dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True), 0.3),
        (dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), 0.9),
    ]),
}


def _model_with(family: str, specs: list[tuple[dict, float]]):
    """A model carrying adapters a0, a1, ... (random), active together at their weights: the oracle."""
    model = build(family)
    for i, (kw, _) in enumerate(specs):
        lorakit.inject(model, lorakit.LoraConfig(**kw), adapter=f"a{i}")
    randomize_adapters(model, seed=3)
    lorakit.set_adapters(model, {f"a{i}": w for i, (_, w) in enumerate(specs)})
    return model


def _adapters(model, specs) -> list[tuple[Adapter, float]]:
    return [(Adapter.from_model(model, f"a{i}"), w) for i, (_, w) in enumerate(specs)]


def _relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.detach().double() - y.detach().double()).norm() / y.detach().double().norm())


@pytest.mark.parametrize("method", ["linear", "cat"])
@pytest.mark.parametrize("case", MIXES)
def test_exact_methods_equal_the_explicit_weighted_sum(case, method):
    family, specs = MIXES[case]
    model = _model_with(family, specs)
    result = combine(_adapters(model, specs), method=method)
    assert result.error == {}
    modules = result.modules()
    for path, layer in lorakit.lora_layers(model):
        # The oracle: each layer's own delta_weight (layout of the base weight), summed at the weights.
        expected = sum(layer.delta_weight(name, w) for name, w in layer.active.items() if name in layer.lora_A)
        got = modules[path].delta()
        got = got if layer.kind == "linear" else got.t()
        assert _relative(got, expected) < 1e-6, path
        assert modules[path].rank == sum(layer.rank(n) for n in layer.active if n in layer.lora_A)


@pytest.mark.parametrize("case", MIXES)
def test_combined_adapter_gives_the_mixed_models_logits_in_lorakit_and_peft(case, ids, tmp_path):
    family, specs = MIXES[case]
    model = _model_with(family, specs)
    expected = logits(model, ids)
    combine(_adapters(model, specs)).save(tmp_path)

    loaded = build(family)
    lorakit.load_adapter(loaded, tmp_path)
    assert torch.allclose(logits(loaded, ids), expected, atol=1e-5, rtol=0)
    ref = peft.PeftModel.from_pretrained(build(family), tmp_path).eval()
    assert torch.allclose(ref(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_peft_linear_has_cross_terms_ours_does_not():
    """PEFT mixes A's and B's separately; the product is not the weighted sum of the updates."""
    base = build("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="first")
    ref.add_adapter("second", config)
    ref.add_weighted_adapter(["first", "second"], [0.5, 0.5], "mix", combination_type="linear")
    layer = ref.base_model.model.model.layers[0].self_attn.q_proj
    truth = 0.5 * layer.get_delta_weight("first") + 0.5 * layer.get_delta_weight("second")
    peft_error = _relative(layer.get_delta_weight("mix"), truth)

    ours = combine([(Adapter(lorakit.LoraConfig(r=4, lora_alpha=8), _peft_tensors(layer, n)), 0.5)
                     for n in ("first", "second")])
    our_error = _relative(ours.modules()["m"].delta(), truth)
    assert peft_error > 0.3 and our_error < 1e-6


def _peft_tensors(layer, name: str) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}m.lora_A.weight": layer.lora_A[name].weight.detach(),
            f"{PREFIX}m.lora_B.weight": layer.lora_B[name].weight.detach()}


def test_peft_saved_embedding_adapter_with_its_base_copy_combines(ids, tmp_path):
    """PEFT saves the base embedding matrix next to an embedding adapter; it passes through unchanged."""
    ref = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["embed_tokens", "o_proj"],
                                                              init_lora_weights=False))
    ref.save_pretrained(tmp_path / "peft")
    adapter = Adapter.load(tmp_path / "peft")
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in adapter.tensors)
    combine([(adapter, 0.5), (adapter, 0.5)]).save(tmp_path / "twice_half")
    once, twice_half = build("llama"), build("llama")
    lorakit.load_adapter(once, tmp_path / "peft")
    lorakit.load_adapter(twice_half, tmp_path / "twice_half")
    assert torch.allclose(logits(twice_half, ids), logits(once, ids), atol=1e-5, rtol=0)


# -- compression by SVD ---------------------------------------------------------------------------


def _hand(name: str, *deltas: list[list[float]], path: str = "m") -> Adapter:
    """An adapter whose module `path` has exactly ΔW (A = identity, B = ΔW, scale 1)."""
    tensors = {}
    for i, delta in enumerate(deltas):
        d = torch.tensor(delta)
        p = path if i == 0 else f"{path}{i}"
        tensors[f"{PREFIX}{p}.lora_A.weight"] = torch.eye(d.shape[1])
        tensors[f"{PREFIX}{p}.lora_B.weight"] = d
    n = len(deltas[0][0])
    return Adapter(lorakit.LoraConfig(r=n, lora_alpha=n, target_modules=["m"]), tensors, name=name)


def test_rank_compression_is_the_best_approximation_and_reports_its_error():
    model = _model_with(*MIXES["mixed ranks and targets"])
    parts = _adapters(model, MIXES["mixed ranks and targets"][1])
    exact = combine(parts).modules()
    small = combine(parts, method="linear", rank=3)
    for path, f in small.modules().items():
        delta = exact[path].delta().double()
        S = torch.linalg.svdvals(delta)
        assert f.rank == min(3, exact[path].rank)
        actual = _relative(f.delta(), delta)
        if exact[path].rank > 3:  # Eckart–Young: the best rank-3 error is the norm of the dropped σ
            assert small.error[path] == pytest.approx(actual, abs=1e-5)
            assert actual == pytest.approx(float(S[3:].norm() / S.norm()), abs=1e-5)
        else:
            assert path not in small.error and actual < 1e-6
    svd = combine(parts, method="svd", rank=64)
    assert max(svd.error.values()) < 1e-6


# -- merge rules on a hand-computed case ----------------------------------------------------------

W1 = [[3.0, -1.0], [0.5, 2.0]]
W2 = [[-2.0, -4.0], [1.0, 0.1]]

# method, weights, density -> expected ΔW, worked out by hand in the comments.
HAND_CASES = {
    # trim to 2 of 4: [[3,0],[0,2]] and [[-2,-4],[0,0]]; signs of the sum [[+,-],[+,+]];
    # mean of the agreeing non-zero entries: [[3/1, -4/1], [0, 2/1]]
    "ties": ("ties", (1.0, 1.0), 0.5, [[3.0, -4.0], [0.0, 2.0]]),
    # a negative weight flips W2 before the election: [[2,4],[0,0]], all agree with +: [[(3+2)/2, 4], [0, 2]]
    "ties, negative weight": ("ties", (1.0, -1.0), 0.5, [[2.5, 4.0], [0.0, 2.0]]),
    "magnitude_prune": ("magnitude_prune", (1.0, 1.0), 0.5, [[1.0, -4.0], [0.0, 2.0]]),
    # density 1 drops nothing: the election alone; sum signs [[+,-],[+,+]] -> [[3, (-1-4)/2], [(0.5+1)/2, (2+0.1)/2]]
    "dare_ties, density 1": ("dare_ties", (1.0, 1.0), 1.0, [[3.0, -2.5], [0.75, 1.05]]),
    "dare_linear, density 1": ("dare_linear", (1.0, 0.5), 1.0, [[2.0, -3.0], [1.0, 2.05]]),
}


@pytest.mark.parametrize("case", HAND_CASES)
def test_merge_rules_on_a_hand_computed_case(case):
    method, (w1, w2), density, expected = HAND_CASES[case]
    result = combine([(_hand("a", W1), w1), (_hand("b", W2), w2)], method=method, density=density, rank=2)
    assert torch.allclose(result.modules()["m"].delta(), torch.tensor(expected), atol=1e-5)
    assert result.error["m"] < 1e-6  # rank 2 holds a 2x2 matrix exactly


def test_dare_keeps_about_density_and_rescales():
    torch.manual_seed(0)
    delta = torch.randn(64, 64)
    adapter = Adapter(lorakit.LoraConfig(r=64, lora_alpha=64),
                      {f"{PREFIX}m.lora_A.weight": torch.eye(64), f"{PREFIX}m.lora_B.weight": delta})
    got = combine([adapter], method="dare_linear", density=0.25, rank=64).modules()["m"].delta()
    kept = got.abs() > 1e-3
    assert 0.2 < kept.float().mean() < 0.3
    assert torch.allclose(got[kept], 4 * delta[kept], atol=1e-3)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_determined_by_the_seed(method):
    parts = [(_hand("a", W1), 1.0), (_hand("b", W2), 1.0)]
    def delta(seed: int) -> torch.Tensor:
        return combine(parts, method=method, density=0.5, seed=seed).modules()["m"].delta()

    assert torch.equal(delta(7), delta(7))
    assert not all(torch.equal(delta(7), delta(seed)) for seed in range(8, 14))


def test_in_memory_and_on_disk_inputs_give_the_same_adapter(tmp_path):
    a, b = _hand("a", W1), _hand("b", W2)
    a.save(tmp_path / "a")
    from_disk = combine([f"{tmp_path / 'a'}:0.5", (b, 2.0)])
    in_memory = combine([(a, 0.5), (b, 2.0)])
    assert all(torch.equal(from_disk.tensors[k], in_memory.tensors[k]) for k in in_memory.tensors)


# -- errors ---------------------------------------------------------------------------------------


def _with_base(adapter: Adapter, base: str) -> Adapter:
    return Adapter(lorakit.LoraConfig.from_dict({**adapter.config.to_dict(), "base_model_name_or_path": base}),
                   adapter.tensors, name=adapter.name)


ERRORS = {
    "unknown method": (lambda: combine([_hand("a", W1)], method="average"), "unknown method 'average'"),
    "rank zero": (lambda: combine([_hand("a", W1)], rank=0), "rank must be a positive integer"),
    "rank negative": (lambda: combine([_hand("a", W1)], method="svd", rank=-2), "rank must be a positive integer"),
    "density zero": (lambda: combine([_hand("a", W1)], method="ties", density=0.0), r"density must be in \(0, 1\]"),
    "density above one": (lambda: combine([_hand("a", W1)], method="dare_ties", density=1.5), "density must be"),
    "density missing": (lambda: combine([_hand("a", W1)], method="ties"), "ties needs a density"),
    "density unused": (lambda: combine([_hand("a", W1)], density=0.5), "density applies to"),
    "cat with rank": (lambda: combine([_hand("a", W1)], method="cat", rank=2), "cat keeps every rank"),
    "no adapters": (lambda: combine([]), "at least one adapter"),
    "missing directory": (lambda: combine(["/nonexistent/adapter:0.5"]), "not found"),
    "weight not finite": (lambda: combine([(_hand("a", W1), float("nan"))]), "finite number"),
    "different bases by name": (lambda: combine([_with_base(_hand("a", W1), "org/llama-7b"),
                                                 _with_base(_hand("b", W2), "org/mistral-7b")]),
                                "'org/llama-7b'.*'org/mistral-7b'"),
    "different bases by shape": (lambda: combine([_hand("a", W1), _hand("b", [[1.0, 2.0, 3.0]] * 2)]),
                                 "module 'm' maps 2 -> 2 in a but 3 -> 2 in b.*different bases"),
    "trained extras": (lambda: combine([Adapter(_hand("a", W1).config, {**_hand("a", W1).tensors,
                                                                        f"{PREFIX}lm_head.weight": torch.ones(2)})]),
                       "combine mixes LoRA updates only"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_say_what_to_change(case):
    call, message = ERRORS[case]
    with pytest.raises(lorakit.UserError, match=message):
        call()


# -- command line ---------------------------------------------------------------------------------


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """`lorakit.cli.main` with a parser holding only `combine` (independent of the COMMANDS table)."""
    parser = argparse.ArgumentParser(prog="lorakit")
    algebra.register(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(lorakit.cli, "build_parser", lambda *_: parser)
    capsys.readouterr()
    code = lorakit.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_combines_reports_compression_and_refuses_to_overwrite(monkeypatch, capsys, tmp_path):
    model = _model_with(*MIXES["mixed ranks and targets"])
    for i in range(2):
        lorakit.save_adapter(model, tmp_path / f"a{i}", adapter=f"a{i}")
    argv = ("combine", f"{tmp_path / 'a0'}:0.7", f"{tmp_path / 'a1'}:-0.4", "--out", str(tmp_path / "mix"))
    code, out, _ = _cli(monkeypatch, capsys, *argv)
    assert code == 0 and "exact" in out and "ranks 2-6" in out
    code, _, err = _cli(monkeypatch, capsys, *argv)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, out, _ = _cli(monkeypatch, capsys, *argv, "--rank", "3", "--overwrite")
    assert code == 0 and "relative error" in out and "max" in out
    assert lorakit.read_adapter(tmp_path / "mix")[0].r == 3


@pytest.mark.parametrize("argv, message", [
    (["--method", "mean"], "unknown method 'mean'"),
    (["--rank", "0"], "rank must be a positive integer"),
    (["--method", "ties", "--density", "2"], "density must be in (0, 1]"),
])
def test_cli_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, tmp_path, argv, message):
    _hand("a", W1).save(tmp_path / "a")
    code, _, err = _cli(monkeypatch, capsys, "combine", str(tmp_path / "a"), "--out", str(tmp_path / "o"), *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_help_lists_methods_and_an_example(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _cli(monkeypatch, capsys, "combine", "--help")
    out = capsys.readouterr().out
    assert "lorakit combine adapters/legal:0.7" in out and all(m in out for m in algebra.METHODS)


def test_factors_shapes_are_file_shapes():
    f = Factors(torch.ones(2, 5), torch.ones(3, 2), 0.5, embedding=False)
    assert f.delta().shape == (3, 5) and f.rank == 2
