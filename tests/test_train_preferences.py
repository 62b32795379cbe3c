"""`lorakit train --objective kto|dpo`: it learns what it is told, and everything train has still holds.

The preference set (`rule_set`): prompts "Say the word W:" whose answers follow a rule, " W." (end
with a full stop), or break it, " W!" (an exclamation mark). DPO pairs the two answers; KTO labels
them good and bad. Training and held-out sets share no word, so what is measured on the held-out set
is the rule, not the words.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.train import TrainConfig, train

WORDS = ("ship sea light word captain crew dawn north river stone garden house bread water fire wind city king "
         "song night morning road field horse church window letter friend mother father child school book paper "
         "table chair door wall tree flower bird fish cloud rain snow summer winter money music story").split()
TRAIN, HELD_OUT = WORDS[:40], WORDS[40:]


def rule_set(directory, objective: str, words: list[str], name: str):
    if objective == "dpo":
        records = [{"prompt": f"Say the word {w}:", "chosen": f" {w}.", "rejected": f" {w}!"} for w in words]
    else:  # alternate good and bad answers, so each word is seen once, following or breaking the rule
        records = [{"prompt": f"Say the word {w}:", "completion": f" {w}{'.' if i % 2 == 0 else '!'}",
                    "label": "good" if i % 2 == 0 else "bad"} for i, w in enumerate(words)]
    path = directory / f"{objective}_{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(tiny_base, tmp_path, objective, out="run", **kw) -> TrainConfig:
    values = dict(data=rule_set(tmp_path, objective, TRAIN, "train"), out=tmp_path / out, base=str(tiny_base),
                  objective=objective, steps=6, batch_size=4, seq_len=24, r=4, lr=5e-3, dtype="fp32",
                  quiet=True, checkpoint_every=2)
    values.update(kw)
    return TrainConfig(**values)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_it_learns_the_rule_on_held_out_prompts(tiny_base, tmp_path, objective):
    held = rule_set(tmp_path, objective, HELD_OUT, "held")
    summary = train(_config(tiny_base, tmp_path, objective, steps=30, eval_data=held, eval_every=15,
                            eval_batches=10))
    evals = [m for m in _metrics(tmp_path / "run") if any(k.startswith("eval_") for k in m)]
    figures = summary["figures"]
    print(objective, {k: round(v, 3) for k, v in figures.items()})
    if objective == "dpo":
        # at step 0 the adapted model is its reference: every margin is 0, accuracy 0.5
        assert figures["eval_accuracy"] >= 0.9 and figures["eval_margin"] > 0
        assert evals[-1]["eval_accuracy"] >= evals[0]["eval_accuracy"]
    else:
        assert figures["eval_rewards_good"] > figures["eval_rewards_bad"]  # good answers rose against bad ones
        assert figures["eval_margin"] > 0.05
        assert "kl" in figures
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny_base, tmp_path, objective):
    whole = train(_config(tiny_base, tmp_path, objective, out="whole"))
    stop_at = 3
    part = train(_config(tiny_base, tmp_path, objective, out="part"), should_stop=lambda step: step == stop_at)
    assert part["interrupted"] and part["step"] == stop_at
    train(_config(tiny_base, tmp_path, objective, out="part", resume=True))
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for w, p in zip(_metrics(tmp_path / "whole"), _metrics(tmp_path / "part"), strict=True):
        assert {k: v for k, v in w.items() if k != "tokens_per_s"} == {k: v for k, v in p.items() if k != "tokens_per_s"}
    assert whole["objective"] == objective and "rewards/margins" in whole["figures"]


def test_init_from_compares_with_the_starting_adapter(tiny_base, tmp_path):
    """Continuing an SFT adapter: the reference is base + that adapter, so the first step's rewards are 0."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Say the word {w}:", "completion": f" {w}."}) + "\n"
                           for w in TRAIN))
    train(TrainConfig(data=sft, out=tmp_path / "sft", base=str(tiny_base), steps=4, batch_size=4, seq_len=24, r=4,
                      lr=1e-2, dtype="fp32", quiet=True))
    train(_config(tiny_base, tmp_path, "dpo", out="dpo", steps=2, init_from=tmp_path / "sft"))
    first = _metrics(tmp_path / "dpo")[0]
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0  # policy == reference at the start
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # log 2
    from_base = _config(tiny_base, tmp_path, "dpo", out="dpo_base", steps=1)
    train(from_base)
    assert _metrics(tmp_path / "dpo_base")[0]["rewards/chosen"] == 0  # a new adapter starts at its reference too


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_two_ranks_train_the_adapter_one_process_does_with_twice_the_batch(tiny_base, tmp_path, objective):
    """KTO's mismatched pairs and KL term span the global batch, so 2 ranks x 2 rows = 1 process x 4 rows."""
    one = _config(tiny_base, tmp_path, objective, out="one", steps=3, batch_size=4)
    train(one)
    data = tmp_path / f"{objective}_train.jsonl"
    subprocess.run([sys.executable, "-m", "lorakit", "train", "--nproc", "2", "--base", str(tiny_base),
                    "--data", str(data), "--out", str(tmp_path / "two"), "--objective", objective, "--steps", "3",
                    "--batch-size", "2", "--seq-len", "24", "--r", "4", "--lr", "5e-3", "--dtype", "fp32",
                    "--quiet"], check=True, timeout=300)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    figures = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ones = _metrics(tmp_path / "one")
    for mine, theirs in zip(figures, ones):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


@pytest.mark.auto_dtype
@pytest.mark.parametrize("args, message", [
    (["--objective", "ppo"], "--objective ppo is not one of sft, kto, dpo"),
    (["--objective", "dpo", "--beta", "0"], "--beta must be a positive number, got 0"),
    (["--objective", "kto", "--undesirable-weight", "-1"], "--undesirable-weight must be a positive number"),
    (["--objective", "kto", "--batch-size", "1"], "use --batch-size 2 or more"),
    (["--objective", "dpo"], "record has no 'chosen'"),
    (["--objective", "dpo", "--beta", "inf"], "--beta must be a positive number, got inf"),
    (["--objective", "dpo", "--beta", "nan"], "--beta must be a positive number, got nan"),
    (["--objective", "kto", "--desirable-weight", "inf"], "--desirable-weight must be a positive number"),
    (["--beta", "0.5"], "apply to --objective kto or dpo"),
    (["--objective", "kto", "--labels", "all"], "--labels applies to --objective sft"),
])
def test_cli_errors_are_one_line(tiny_base, tmp_path, capsys, args, message):
    data = rule_set(tmp_path, "kto", TRAIN, "train")
    code = main(["train", "--base", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "x"), "--quiet",
                 "--steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["activation_checkpointing", pytest.param("compile", marks=pytest.mark.slow)])
def test_memory_and_speed_options_train_the_same_preference_adapter(tiny_base, tmp_path, option):
    """The reference pass runs under no_grad with adapters disabled, inside checkpointed / compiled layers."""
    train(_config(tiny_base, tmp_path, "kto", out="plain", steps=3))
    train(_config(tiny_base, tmp_path, "kto", out="option", steps=3, **{option: True}))
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    other = load_file(tmp_path / "option" / "adapter_model.safetensors")
    for key in plain:
        torch.testing.assert_close(plain[key], other[key], rtol=1e-4, atol=1e-5, msg=key)


def test_qlora_trains_a_preference_adapter(tiny_base, tmp_path):
    summary = train(_config(tiny_base, tmp_path, "dpo", steps=3, quantize="nf4", seq_len=24))
    assert summary["memory"]["nf4_params"] > 0
    weights = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)
