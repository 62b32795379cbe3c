"""`lorakit sweep` on a tiny base: the grid, its outputs, resuming a killed sweep, hostile flags."""

from __future__ import annotations

import json
import shlex

import pytest

from lorakit import sweep as sweep_module
from lorakit.cli import build_parser, main
from lorakit.options import options
from lorakit.sweep import Recipe, SweepConfig, recipes, recommend, sweep
from lorakit.train import FULL_LR, LORA_LR, TrainConfig

DOMAIN = "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n" * 40
GENERAL = "The function returns a new list; the original is not changed. Call it with a key to sort by.\n" * 20


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in (("train", DOMAIN), ("held", DOMAIN[::-1][:2000]), ("general", GENERAL)):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(text)
    return paths


def _config(tiny_base, files, out, **kw) -> SweepConfig:
    values = dict(data=files["train"], eval_data=files["held"], general_data=files["general"], out=out,
                  base=str(tiny_base), ranks="2", lrs=f"{LORA_LR:g}", steps=4, batch_size=2, seq_len=16,
                  eval_rows=6, dtype="fp32", quiet=True)
    values.update(kw)
    return SweepConfig(**values)


def test_the_grid_varies_one_setting_at_a_time_around_trains_defaults(tiny_base, files, tmp_path):
    config = _config(tiny_base, files, tmp_path / "s", ranks="4,16", lrs="1e-4,1e-3", targets=["q_proj", "all-linear"],
                     data_fractions="0.5,1")
    names = [r.name for r in recipes(config)]
    default = recipes(config)[0]
    assert default.kind == "lora" and default.lr == LORA_LR
    assert len(names) == len(set(names))
    assert f"full lr={FULL_LR:g}" in names
    assert any(r.r == 4 and r.targets == default.targets and r.lr == LORA_LR for r in recipes(config))
    assert any(r.targets == "q_proj" and r.r == default.r for r in recipes(config))
    assert {r.kind for r in recipes(config) if r.fraction == 0.5} == {"lora", "full", "scratch"}
    product = recipes(_config(tiny_base, files, tmp_path / "s", ranks="4,16", lrs="1e-4,1e-3", product=True,
                              targets=["q_proj", "all-linear"], full=False))
    assert len(product) == 2 * 2 * 2 and all(r.kind == "lora" for r in product)


def test_sweep_writes_results_table_and_plots(tiny_base, files, tmp_path, capsys):
    out = tmp_path / "s"
    config = _config(tiny_base, files, out, data_fractions="0.5,1", seed=1)  # tiny_base itself is seed 0's init
    rows = sweep(config)
    assert rows[0]["kind"] == "base" and len(rows) == 1 + len(recipes(config))
    on_disk = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["recipe"] for r in on_disk) == sorted(r["recipe"] for r in rows)
    lora = next(r for r in rows if r["kind"] == "lora" and r["fraction"] == 1)
    assert list(lora["domain"]) == list(lora["general"]) == ["0.5", "1", "2"]  # every scale, both sets
    full = next(r for r in rows if r["kind"] == "full" and r["fraction"] == 1)
    assert full["trainable_params"] > lora["trainable_params"] and full["weights_bytes"] > lora["weights_bytes"]
    scratch = next(r for r in rows if r["kind"] == "scratch" and r["fraction"] == 1)
    assert scratch["domain"]["1"] != full["domain"]["1"]  # its own random start, not the base's weights
    assert not list((out / "runs" / Recipe("full", full["lr"]).slug).glob("*.safetensors"))  # removed once scored
    half = next(r for r in rows if r["kind"] == "scratch" and r["fraction"] == 0.5)
    assert half["steps"] == 2 and half["tokens"] == 2 * 2 * 16
    for name in ("table.md", "frontier.png", "data_curve.png"):
        assert (out / name).stat().st_size > 0, name
    best = recommend(rows)
    printed = capsys.readouterr().out
    assert f"recommended: {best['recipe']}" in printed and best["command"] in printed
    args = build_parser("train").parse_args(shlex.split(best["command"])[1:])  # the command trains that recipe
    trains = TrainConfig(**options(args, TrainConfig))
    assert (trains.r, trains.targets, trains.lr, trains.steps) == (best["r"], best["targets"], best["lr"], 4)
    assert "| full lr=" in (out / "table.md").read_text()


def test_a_killed_sweep_continues_where_it_stopped(tiny_base, files, tmp_path, monkeypatch):
    straight = sweep(_config(tiny_base, files, tmp_path / "straight"))
    out = tmp_path / "killed"
    config = _config(tiny_base, files, out)
    trained = []
    real_train = sweep_module.train

    def spy(settings, should_stop=None):
        trained.append((settings.out.name, settings.resume))
        return real_train(settings, should_stop)

    monkeypatch.setattr(sweep_module, "train", spy)
    # Ctrl-C in the second recipe's third step: that recipe checkpoints, the first stays finished
    stop_in_second = lambda step: len(trained) == 2 and step == 3  # noqa: E731
    assert sweep(config, should_stop=stop_in_second) is None
    assert len((out / "results.jsonl").read_text().splitlines()) == 2  # base + the first recipe
    trained.clear()
    resumed = sweep(config)
    grid = recipes(config)
    assert trained[0] == (grid[1].slug, True)  # the interrupted one resumes; the finished one is not retrained
    assert [name for name, _ in trained] == [r.slug for r in grid[1:]]
    assert [r["recipe"] for r in resumed] == [r["recipe"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a["domain"] == b["domain"] and a.get("general") == b.get("general"), a["recipe"]


def test_a_sweep_with_other_settings_is_not_mixed_in(tiny_base, files, tmp_path, capsys):
    out = tmp_path / "s"
    sweep(_config(tiny_base, files, out, full=False))
    code = main(["sweep", "--base", str(tiny_base), "--data", str(files["train"]), "--eval-data", str(files["held"]),
                 "--general-data", str(files["general"]), "--out", str(out), "--batch-size", "2", "--seq-len", "16",
                 "--eval-rows", "6", "--dtype", "fp32", "--steps", "5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "other settings (--steps 4)" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, message", [
    (["--ranks", "0"], "--ranks takes positive whole numbers"),
    (["--ranks", "2.5"], "--ranks takes positive whole numbers"),
    (["--lrs", "fast"], "--lrs takes comma-separated numbers"),
    (["--scales", "nan"], "--scales takes finite numbers"),
    (["--data-fractions", "2"], "shares of the budget"),
    (["--steps", "0"], "--steps must be positive"),
    (["--full-lr", "-1"], "--full-lr must be a positive number"),
    (["--targets", "("], "not a valid regular expression"),
    (["--eval-data", "{missing}"], "not found"),
    (["--out", "{file}"], "is a file"),
])
def test_hostile_flags_are_one_line(tiny_base, files, tmp_path, capsys, flags, message):
    flags = [f.format(missing=tmp_path / "nope.txt", file=files["train"]) for f in flags]
    args = ["sweep", "--base", str(tiny_base), "--data", str(files["train"]), "--eval-data", str(files["held"]),
            "--out", str(tmp_path / "s"), "--quiet", *flags]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_an_out_that_is_not_a_sweep_is_left_alone(tiny_base, files, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = main(["sweep", "--base", str(tiny_base), "--data", str(files["train"]), "--eval-data", str(files["held"]),
                 "--out", str(out), "--overwrite", "--quiet"])
    assert code == 2 and "not a sweep directory" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
