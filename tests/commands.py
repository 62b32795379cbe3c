"""Helpers for the tests of the commands that read adapters from disk (export, inspection, generate, eval)."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import randomize_adapters

import lorakit
import lorakit.cli
from lorakit.base import EMBEDDED_BASE, load_base
from lorakit.train import TrainConfig, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")
EMBEDDED_MISSING = pytest.mark.skipif(not (EMBEDDED_BASE / "config.json").is_file(),
                                      reason="the embedded base is not built yet (tiny_base versions still run)")


def save_random_adapter(base: str | None, directory, seed: int, scale: float = 0.1, **kw):
    model, _ = load_base(base, device=CPU)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **kw}
    lorakit.inject(model, lorakit.LoraConfig(base_model_name_or_path=lorakit_base_name(base), **kw))
    randomize_adapters(model, seed=seed, scale=scale)
    lorakit.save_adapter(model, directory)
    return directory


def lorakit_base_name(base: str | None) -> str:
    return "lorakit/embedded" if base is None else str(base)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    base = str(tiny_base)
    return {"a": save_random_adapter(base, d / "a", seed=1),
            "b": save_random_adapter(base, d / "b", seed=2, r=2, target_modules=["q_proj", "o_proj"], use_rslora=True),
            "zero": save_random_adapter(base, d / "zero", seed=3, scale=0.0)}


def run_cli(monkeypatch, capsys, module, *argv: str) -> tuple[int, str, str]:
    """`lorakit.cli.main` with a parser holding only `module`'s commands."""
    parser = argparse.ArgumentParser(prog="lorakit")
    module.register(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(lorakit.cli, "build_parser", lambda *_: parser)
    capsys.readouterr()
    code = lorakit.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_adapter(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "a"
    data = out.parent / "d.txt"
    data.write_text("the crew sailed north at dawn and sang. " * 60)
    train(TrainConfig(data=data, out=out, base=str(tiny_base), steps=15, batch_size=4, seq_len=32, lr=1e-2,
                      dtype="fp32", quiet=True))
    return out
