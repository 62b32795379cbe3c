"""Loading a base: the precision policy behind `--dtype auto`, and `PATH:SCALE` adapter specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit import base
from lorakit.errors import UserError

CPU = torch.device("cpu")
pytestmark = pytest.mark.auto_dtype  # these tests are about the policy itself


@pytest.mark.parametrize("setting, expected", [("1", torch.bfloat16), ("0", torch.float32), (" 1 ", torch.bfloat16)])
def test_the_environment_variable_decides_auto_on_a_cpu(monkeypatch, setting, expected):
    monkeypatch.setenv("LORAKIT_CPU_BF16", setting)
    assert base.resolve_dtype("auto", CPU) == expected


def test_without_the_variable_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("LORAKIT_CPU_BF16", raising=False)
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    fast = "avx512_bf16" in flags or "amx_bf16" in flags
    assert base.resolve_dtype("auto", CPU) == (torch.bfloat16 if fast else torch.float32)


@pytest.mark.parametrize("setting", ["yes", "2", "true", "-1"])
def test_a_bad_setting_is_one_clear_error(monkeypatch, setting):
    monkeypatch.setenv("LORAKIT_CPU_BF16", setting)
    with pytest.raises(UserError, match="LORAKIT_CPU_BF16.*0 or 1"):
        base.resolve_dtype("auto", CPU)


def test_explicit_dtypes_ignore_the_policy(monkeypatch):
    monkeypatch.setenv("LORAKIT_CPU_BF16", "1")
    assert base.resolve_dtype("fp32", CPU) == torch.float32
    assert base.resolve_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        base.resolve_dtype("fp8", CPU)




# -- decoding commands: `auto` by the model's size, from its config.json ------------------------------------


def _config(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(text)
    return path


def test_a_small_model_decodes_in_fp32_where_auto_picks_bf16(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKIT_CPU_BF16", raising=False)
    monkeypatch.setattr(base, "cpu_flags_have_fast_bf16", lambda: True)
    qwen = _config(tmp_path, "qwen", '{"hidden_size": 896, "intermediate_size": 4864}')
    big = _config(tmp_path, "big", '{"hidden_size": 4096, "intermediate_size": 11008}')
    odd = _config(tmp_path, "odd", '{"hidden_size": "wide"}')
    assert base.resolve_decode_dtype("auto", CPU, None) == torch.float32  # the embedded base: 704x256
    assert base.resolve_decode_dtype("auto", CPU, qwen) == torch.bfloat16  # 4864x896: bf16 wins at this size
    assert base.resolve_decode_dtype("auto", CPU, big) == torch.bfloat16
    assert base.resolve_decode_dtype("auto", CPU, odd) == torch.bfloat16  # no sizes: the flags decide
    assert base.resolve_decode_dtype("auto", CPU, None, quantize="nf4") == torch.bfloat16
    assert base.resolve_decode_dtype("fp32", CPU, qwen) == torch.float32
    assert base.resolve_decode_dtype("bf16", CPU, None) == torch.bfloat16
    assert {base.resolve_decode_dtype("auto", CPU, None) for _ in range(20)} == {torch.float32}  # never flips
    monkeypatch.setenv("LORAKIT_CPU_BF16", "1")  # the variable decides outright
    assert base.resolve_decode_dtype("auto", CPU, None) == torch.bfloat16
    monkeypatch.setattr(base, "cpu_flags_have_fast_bf16", lambda: False)
    monkeypatch.delenv("LORAKIT_CPU_BF16")
    assert base.resolve_decode_dtype("auto", CPU, qwen) == torch.float32


def test_gpt2_style_configs_give_their_shapes(tmp_path):
    (tmp_path / "config.json").write_text('{"n_embd": 64}')
    assert base._linear_shapes(tmp_path) == [(64, 64), (256, 64), (64, 256)]

