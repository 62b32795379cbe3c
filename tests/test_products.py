"""fp32 products through oneDNN (`lorakit.products`): torch's results to fp32 rounding, only where asked,
and a training run that multiplies the same way from start to end, resumed or not."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build
from safetensors.torch import load_file

import lorakit
from lorakit import products
from lorakit.errors import UserError
from lorakit.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not products.available(), reason="this torch has no oneDNN")

TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n" * 30


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to fp32 rounding: the two libraries sum in different orders."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("rows, inp, out", [(1, 16, 24), (7, 96, 48), (64, 32, 200), (300, 64, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_products_equal_torch_to_fp32_rounding(rows, inp, out, bias):
    g = torch.Generator().manual_seed(rows + inp + out)
    x, w = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    gy = torch.randn(rows, out, generator=g)
    with products.onednn_fp32(True):
        y, gx = products.linear(x, w, b), products.grad_input(gy, w)
    assert y.shape == (rows, out) and gx.shape == (rows, inp)
    assert _close(y, F.linear(x, w, b)) and _close(gx, gy @ w)
    x_strided = torch.randn(inp, rows, generator=g).t()  # not contiguous: what a transposed view gives
    with products.onednn_fp32(True):
        assert _close(products.linear(x_strided, w), F.linear(x_strided, w))


def test_outside_the_context_and_for_other_dtypes_the_products_are_torchs_own():
    g = torch.Generator().manual_seed(0)
    x, w, gy = torch.randn(9, 40, generator=g), torch.randn(30, 40, generator=g), torch.randn(9, 30, generator=g)
    assert torch.equal(products.linear(x, w), F.linear(x, w)) and torch.equal(products.grad_input(gy, w), gy @ w)
    with products.onednn_fp32(True):
        with products.onednn_fp32(False):  # nested: the inner one decides, the outer comes back
            assert torch.equal(products.linear(x, w), F.linear(x, w))
        xb, wb = x.bfloat16(), w.bfloat16()
        assert torch.equal(products.linear(xb, wb), F.linear(xb, wb))  # bf16: torch already runs oneDNN
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the precision, as for F.linear
            auto = products.linear(x, w)
            assert auto.dtype == torch.bfloat16 and torch.equal(auto, F.linear(x, w))
    assert not products._onednn


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), (" 1 ", True), ("", None)])
def test_the_environment_variable_decides_outright(monkeypatch, value, expected):
    monkeypatch.setenv(products.ENV, value)
    assert products.setting() is expected
    for serving in (False, True):
        cpu = products.cpu_prefers_onednn(serving)
        assert products.choose(serving) is (cpu if expected is None else expected)


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_a_bad_environment_variable_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(products.ENV, value)
    with pytest.raises(UserError, match=f"{products.ENV}=.*is not 0 or 1"):
        products.setting()


@pytest.mark.parametrize("vendor, flags, expected, serving", [
    ("AuthenticAMD", "fpu sse2 avx2 fma avx512f avx512_bf16", True, True),  # Zen 4/5: MKL at half oneDNN's speed
    ("AuthenticAMD", "fpu sse2 avx2 fma", True, False),  # AVX2 only: the server's transposed MKL product as fast
    ("AuthenticAMD", "fpu sse2 sse4_2", False, False),  # no AVX2: not measured
    ("AuthenticAMD", "fpu sse2 avx2", False, False),  # AVX2 without FMA: not measured
    ("GenuineIntel", "fpu sse2 avx2 fma avx512f amx_bf16", False, False),  # MKL's own vendor
    ("GenuineIntel", "fpu sse2 avx2 fma", False, False),
    ("", "", False, False),
])
def test_the_cpu_decides_by_vendor_and_flags(vendor, flags, expected, serving):
    assert products.prefers_onednn(vendor, flags.split()) is expected
    assert products.prefers_onednn(vendor, flags.split(), serving=True) is serving


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_lora_layer_gives_the_same_outputs_and_gradients_both_ways(dropout):
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear"))
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    results = []
    for onednn in (False, True):
        torch.manual_seed(0)  # the same dropout masks
        with products.onednn_fp32(onednn):
            loss = model(input_ids=ids, labels=ids).loss
        model.zero_grad()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, grads0), (loss1, grads1) = results
    assert grads0 and grads0.keys() == grads1.keys()
    assert _close(loss1, loss0) and all(_close(grads1[n], grads0[n]) for n in grads0)


def _config(tiny_base, tmp_path, out, **kw) -> TrainConfig:
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    values = dict(data=data, out=tmp_path / out, base=str(tiny_base), steps=6, batch_size=2, seq_len=16, r=4,
                  dtype="fp32", quiet=True, checkpoint_every=2)
    return TrainConfig(**{**values, **kw})


def test_training_through_onednn_gives_the_losses_and_adapter_torch_does(tiny_base, tmp_path, monkeypatch):
    adapters, losses = [], []
    for value in ("0", "1"):
        monkeypatch.setenv(products.ENV, value)
        train(_config(tiny_base, tmp_path, f"run{value}"))
        adapters.append(load_file(tmp_path / f"run{value}" / "adapter_model.safetensors"))
        metrics = (tmp_path / f"run{value}" / "metrics.jsonl").read_text().splitlines()
        losses.append(torch.tensor([json.loads(line)["loss"] for line in metrics]))
    assert len(losses[0]) == 6 and torch.allclose(losses[1], losses[0], rtol=1e-4)  # every step's loss
    # AdamW's first steps move each weight by about lr whatever its gradient's size, so a gradient within
    # rounding of zero may move either way: the adapters agree as a whole, not element by element
    assert adapters[0].keys() == adapters[1].keys()
    for k in adapters[0]:
        assert (adapters[1][k] - adapters[0][k]).norm() <= 1e-2 * adapters[0][k].norm() + 1e-6, k


@pytest.mark.parametrize("first, then", [("1", "0"), ("0", "1")])
def test_a_resumed_run_multiplies_as_its_checkpoint_recorded(tiny_base, tmp_path, monkeypatch, first, then):
    monkeypatch.setenv(products.ENV, first)
    train(_config(tiny_base, tmp_path, "straight"))
    train(_config(tiny_base, tmp_path, "resumed"), should_stop=lambda step: step == 3)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["onednn_fp32"] is (first == "1")
    monkeypatch.setenv(products.ENV, then)  # the resuming process would choose the other way
    train(_config(tiny_base, tmp_path, "resumed", resume=True))
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_says_when_its_products_go_through_onednn(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(products.ENV, "1")
    train(_config(tiny_base, tmp_path, "on", quiet=False, steps=1))
    assert "fp32 products through oneDNN" in capsys.readouterr().out
    monkeypatch.setenv(products.ENV, "0")
    train(_config(tiny_base, tmp_path, "off", quiet=False, steps=1))
    assert "oneDNN" not in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_bad_setting_stops_lorakit_train_in_one_line_before_anything_is_written(tiny_base, tmp_path, monkeypatch,
                                                                                 capsys, dtype):
    from lorakit.cli import main

    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    monkeypatch.setenv(products.ENV, "on")
    code = main(["train", "--base", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "run"), "--quiet",
                 "--dtype", dtype, "--steps", "1", "--batch-size", "2", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert code == 2 and f"{products.ENV}='on' is not 0 or 1" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_the_choice_resumes_through_torchs_blas(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv(products.ENV, "0")
    train(_config(tiny_base, tmp_path, "straight"))
    train(_config(tiny_base, tmp_path, "resumed"), should_stop=lambda step: step == 3)
    state_file = tmp_path / "resumed" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["onednn_fp32"]  # what an older lorakit wrote: it always multiplied through torch's BLAS
    state_file.write_text(json.dumps(state))
    monkeypatch.setenv(products.ENV, "1")
    train(_config(tiny_base, tmp_path, "resumed", resume=True))
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_with_a_bad_choice_is_damaged(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv(products.ENV, "0")
    train(_config(tiny_base, tmp_path, "run", checkpoint_every=10), should_stop=lambda step: step == 3)
    state_file = tmp_path / "run" / "checkpoint" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "onednn_fp32": "yes"}))
    with pytest.raises(UserError, match="'onednn_fp32' is not true or false"):
        train(_config(tiny_base, tmp_path, "run", checkpoint_every=10, resume=True))
