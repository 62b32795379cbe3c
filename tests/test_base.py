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


