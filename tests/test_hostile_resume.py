"""Hostile checkpoints and resumes: damaged files, a run resumed with other settings or other data, a crash
mid-way through a checkpoint's swap, a loss that turns NaN. A resume either ends with exactly the adapter
an uninterrupted run gives or is refused in one line with --out as it was.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import UserError
from lorakit.files import previous_directory
from lorakit.train import TrainConfig, train
from tests.hostile import assert_refused, assert_unchanged, run_cli, snapshot

TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n" * 30
STEPS = 4


def _argv(tiny_base, data, out, *extra) -> list[str]:
    return ["train", "--base", tiny_base, "--data", data, "--out", out, "--steps", str(STEPS), "--batch-size", "2",
            "--seq-len", "16", "--r", "4", "--dropout", "0.1", "--dtype", "fp32", "--checkpoint-every", "1", "--quiet",
            *map(str, extra)]


def _config(tiny_base, data, out, **kw) -> TrainConfig:
    values = dict(data=data, out=out, base=str(tiny_base), steps=STEPS, batch_size=2, seq_len=16, r=4, dropout=0.1,
                  dtype="fp32", quiet=True, checkpoint_every=1)
    return TrainConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """An uninterrupted run's adapter, and a run stopped after step 2 with its checkpoint (copied per case)."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "d.txt"
    data.write_text(TEXT)
    train(_config(tiny_base, data, root / "straight"))
    stopped = train(_config(tiny_base, data, root / "stopped"), should_stop=lambda step: step == 2)
    assert stopped["interrupted"] and (root / "stopped" / "checkpoint" / "state.json").is_file()
    return {"root": root, "data": data, "straight": root / "straight", "stopped": root / "stopped"}


def _same_adapter(a: Path, b: Path) -> None:
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()


def _json(path: Path, change: Callable) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _tensors(path: Path, change: Callable) -> None:
    save_file(change(load_file(path)), path)


@dataclass
class Case:
    id: str
    damage: Callable[[Path, Path], None]  # (out, data) -> None
    extra: tuple = ()
    mentions: str | None = None


CK = "checkpoint"
REFUSED = [
    Case("state-not-json", lambda o, d: (o / CK / "state.json").write_text("{nope"), mentions="state.json"),
    Case("state-a-list", lambda o, d: (o / CK / "state.json").write_text("[1, 2]"), mentions="state.json"),
    Case("state-without-step", lambda o, d: _json(o / CK / "state.json", lambda m: {**m, "step": None}),
         mentions="step"),
    Case("state-negative-tokens", lambda o, d: _json(o / CK / "state.json", lambda m: {**m, "tokens": -5}),
         mentions="state.json"),
    Case("state-5000-digits", lambda o, d: (o / CK / "state.json").write_text('{"step": ' + "9" * 5000 + "}"),
         mentions="state.json"),
    Case("state-a-directory", lambda o, d: ((o / CK / "state.json").unlink(), (o / CK / "state.json").mkdir()),
         mentions="state.json"),
    Case("param-groups-garbage", lambda o, d: _json(o / CK / "state.json", lambda m: {**m, "param_groups": [1]}),
         mentions="optimizer"),
    Case("adapter-missing-a-key", lambda o, d: _tensors(o / CK / "adapter_model.safetensors",
                                                        lambda t: dict(list(t.items())[1:])), mentions="lacks"),
    Case("adapter-nan", lambda o, d: _tensors(o / CK / "adapter_model.safetensors",
                                              lambda t: {k: v * float("nan") for k, v in t.items()}),
         mentions="finite"),
    Case("adapter-truncated", lambda o, d: (o / CK / "adapter_model.safetensors").write_bytes(b"\x08" * 9),
         mentions="safetensors"),
    Case("optimizer-garbage", lambda o, d: (o / CK / "optimizer.safetensors").write_bytes(b"\x00" * 40),
         mentions="optimizer"),
    Case("optimizer-without-rng", lambda o, d: _tensors(o / CK / "optimizer.safetensors",
                                                        lambda t: {k: v for k, v in t.items() if "rng" not in k}),
         mentions="random state"),
    Case("checkpoint-is-a-file", lambda o, d: (shutil.rmtree(o / CK), (o / CK).write_text("x")),
         mentions="nothing to resume"),
    Case("checkpoint-symlink-loop", lambda o, d: (shutil.rmtree(o / CK), (o / CK).symlink_to(o / CK)),
         mentions="nothing to resume"),
    Case("metrics-garbage-mid-file", lambda o, d: (o / "metrics.jsonl").write_text(
        "not json\n" + (o / "metrics.jsonl").read_text()), mentions="metrics.jsonl:1"),
    Case("changed-steps", lambda o, d: None, extra=("--steps", "6"), mentions="--steps (was 4, now 6)"),
    Case("changed-epochs", lambda o, d: None, extra=("--epochs", "2"), mentions="--epochs"),
    Case("changed-dtype", lambda o, d: None, extra=("--dtype", "bf16"), mentions="--dtype (was fp32, now bf16)"),
    Case("changed-lr", lambda o, d: None, extra=("--lr", "0.5"), mentions="--lr"),
    Case("changed-seed", lambda o, d: None, extra=("--seed", "3"), mentions="--seed"),
    Case("changed-data-contents", lambda o, d: d.write_text(TEXT + "More words.\n"), mentions="contents"),
    Case("finished-run", lambda o, d: (shutil.rmtree(o / CK), (o / "training_summary.json").write_text("{}")),
         mentions="finished"),
]


def _damaged_copy(runs, case, tmp_path):
    """The stopped run and its data copied under tmp_path, then damaged as `case` says: (out, data)."""
    out, data = tmp_path / "run", tmp_path / "d.txt"
    shutil.copytree(runs["stopped"], out)
    shutil.copy(runs["data"], data)
    case.damage(out, data)
    return out, data


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_a_damaged_or_changed_resume_is_refused_in_one_line(case, runs, tiny_base, tmp_path):
    out, data = _damaged_copy(runs, case, tmp_path)
    before = snapshot(tmp_path)
    run = run_cli(_argv(tiny_base, data, out, *case.extra, "--resume"), cwd=tmp_path)
    assert_refused(run, 2, case.mentions)
    assert_unchanged(before, snapshot(tmp_path))


def _mid_swap(out: Path, data: Path) -> None:  # killed between the two renames of a checkpoint's swap
    (out / CK).rename(previous_directory(out / CK))


def _damaged_but_previous_kept(out: Path, data: Path) -> None:  # the previous checkpoint is there, the new one broke
    shutil.copytree(out / CK, previous_directory(out / CK))
    (out / CK / "state.json").write_text("{torn")


def _torn_metrics(out: Path, data: Path) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed while appending


def _stale_staging(out: Path, data: Path) -> None:  # killed while writing the next checkpoint
    staging = out / ".checkpoint.abc123.tmp"
    shutil.copytree(out / CK, staging)
    (staging / "state.json").unlink()


RESUMED = [
    Case("torn-last-metrics-line", _torn_metrics),
    Case("mid-swap-only-previous", _mid_swap),
    Case("damaged-with-previous-kept", _damaged_but_previous_kept),
    Case("stale-staging-directory", _stale_staging),
    Case("reporting-settings-may-change", lambda o, d: None,
         extra=("--checkpoint-every", "3", "--eval-data", "{data}", "--eval-every", "1", "--eval-batches", "1")),
]


@pytest.mark.parametrize("case", RESUMED, ids=lambda c: c.id)
def test_a_resume_after_a_crash_ends_with_the_uninterrupted_adapter(case, runs, tiny_base, tmp_path):
    out, data = _damaged_copy(runs, case, tmp_path)
    extra = [str(e).format(data=data) for e in case.extra]
    run = run_cli(_argv(tiny_base, data, out, *extra, "--resume"), cwd=tmp_path)
    assert run.code == 0 and "Traceback" not in run.err, run.err
    _same_adapter(out, runs["straight"])
    assert not (out / CK).exists() and not previous_directory(out / CK).exists()
    assert not list(out.glob(".checkpoint.*"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_a_non_finite_loss_stops_training_keeps_the_last_checkpoint_and_saves_no_adapter(runs, tiny_base, tmp_path,
                                                                                        monkeypatch):
    import lorakit.objectives

    real = lorakit.objectives.causal_lm_loss
    calls = []

    def nan_at_step_3(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(lorakit.objectives, "causal_lm_loss", nan_at_step_3)
    out, data = tmp_path / "run", runs["data"]
    run = run_cli(_argv(tiny_base, data, out), cwd=tmp_path)
    assert_refused(run, 2, "step 3: the loss is nan")
    assert "last good checkpoint is kept" in run.err
    assert not (out / "adapter_model.safetensors").exists() and not (out / "training_summary.json").exists()
    state = json.loads((out / CK / "state.json").read_text())
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(out / CK / "adapter_model.safetensors").values())
    monkeypatch.setattr(lorakit.objectives, "causal_lm_loss", real)
    run = run_cli(_argv(tiny_base, data, out, "--resume"), cwd=tmp_path)  # the cause gone, the run goes on
    assert run.code == 0, run.err
    _same_adapter(out, runs["straight"])


def test_a_non_finite_gradient_is_caught_too(runs, tiny_base, tmp_path, monkeypatch):
    import lorakit.objectives

    real = lorakit.objectives.causal_lm_loss

    class Overflow(torch.autograd.Function):  # the identity forward, an infinite backward
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    def inf_gradient(model, batch):  # a finite loss whose gradient overflows
        return Overflow.apply(real(model, batch))

    monkeypatch.setattr(lorakit.objectives, "causal_lm_loss", inf_gradient)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="step 1: the gradient norm is (nan|inf).*no checkpoint had been written"):
        train(_config(tiny_base, runs["data"], out, max_grad_norm=0.0))
    assert not (out / "adapter_model.safetensors").exists()


def test_overwrite_leaves_no_file_of_the_earlier_run(runs, tiny_base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["straight"], out)  # a finished run: adapter, metrics, plot, summary
    before = snapshot(tmp_path)
    bad = run_cli(_argv(tiny_base, tmp_path / "missing.txt", out, "--overwrite"), cwd=tmp_path)
    assert_refused(bad, 2, "not found")
    assert_unchanged(before, snapshot(tmp_path))  # a refused --overwrite touches nothing
    result = train(_config(tiny_base, runs["data"], out, overwrite=True), should_stop=lambda step: step == 1)
    assert result["interrupted"]
    left = sorted(p.name for p in out.iterdir())
    assert left == ["checkpoint", "loss.png", "metrics.jsonl"], left  # nothing of the earlier run beside it
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
