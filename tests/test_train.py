"""End-to-end training on a tiny base: outputs, resume equivalence, formats, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.train import TrainConfig, train

TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n" * 30


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(TEXT)
    return path


def _config(tiny_base, data, out, **kw) -> TrainConfig:
    values = dict(data=data, out=out, base=str(tiny_base), steps=6, batch_size=2, seq_len=16, r=4,
                  dtype="fp32", quiet=True, checkpoint_every=2)
    if kw.get("full"):
        del values["r"]  # an adapter's option: --full refuses it
    values.update(kw)
    return TrainConfig(**values)


def test_train_writes_adapter_metrics_plot_and_summary(tiny_base, text_file, tmp_path):
    out = tmp_path / "run"
    summary = train(_config(tiny_base, text_file, out, eval_data=text_file, eval_every=3, steps=8, lr=5e-3))
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "training_summary.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert [m["step"] for m in metrics if "eval_loss" in m] == [3, 6, 8]
    on_disk = json.loads((out / "training_summary.json").read_text())
    assert on_disk["trainable_params"] == summary["trainable_params"] > 0
    assert on_disk["tokens_seen"] == 8 * 2 * 16
    assert summary["eval_perplexity_adapted"] < summary["eval_perplexity_base"]  # it learned something
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"


@pytest.mark.parametrize("options", [{"dropout": 0.0}, {"dropout": 0.1}, {"trainable_tokens": "5,7"}])
def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny_base, text_file, tmp_path, options):
    straight = tmp_path / "straight"
    train(_config(tiny_base, text_file, straight, **options))
    resumed = tmp_path / "resumed"
    result = train(_config(tiny_base, text_file, resumed, **options), should_stop=lambda step: step == 3)
    assert result == {"interrupted": True, "step": 3, "total_steps": 6}
    assert (resumed / "checkpoint" / "state.json").is_file()
    train(_config(tiny_base, text_file, resumed, resume=True, **options))
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_resume_refuses_changed_settings(tiny_base, text_file, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_base, text_file, out), should_stop=lambda step: step == 2)
    with pytest.raises(UserError, match="--resume continues the same run.*changes --lr"):
        train(_config(tiny_base, text_file, out, resume=True, lr=0.5))


@pytest.mark.parametrize("records", [
    [{"prompt": "Q: light? A:", "completion": " yes, light."}] * 6,
    [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "let there be light"}]}] * 6,
    [{"text": "there was light", "label": "good"}, {"text": "darkness", "label": "bad"}] * 6,
])
def test_jsonl_formats_train(tiny_base, tmp_path, records):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = train(_config(tiny_base, data, tmp_path / "run", steps=2, seq_len=32))
    assert summary["tokens_seen"] > 0


def test_init_from_continues_an_adapter(tiny_base, text_file, tmp_path):
    first = tmp_path / "first"
    train(_config(tiny_base, text_file, first, steps=2))
    second = tmp_path / "second"
    train(_config(tiny_base, text_file, second, steps=2, init_from=first, r=99))
    config = json.loads((second / "adapter_config.json").read_text())
    assert config["r"] == 4  # the continued adapter keeps its shape
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.auto_dtype
def test_cli_errors_are_one_line(tiny_base, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    cases = [
        (["--data", str(text_file), "--out", str(out)], "already exists; pass --overwrite"),
        (["--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o1")], "not found"),
        (["--data", str(text_file), "--out", str(tmp_path / "o2"), "--seq-len", "4096"], "maximum of 128"),
        (["--data", str(text_file), "--out", str(text_file / "sub")], "is a file, not a directory"),
        (["--data", str(text_file), "--out", str(tmp_path / "o3"), "--r", "0"], "--r must be a positive integer"),
        (["--data", str(text_file), "--out", str(tmp_path / "o4"), "--resume"], "nothing to resume"),
    ]
    for args, message in cases:
        code = main(["train", "--base", str(tiny_base), "--quiet", *args])
        err = capsys.readouterr().err
        assert code == 2, args
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err


@pytest.mark.auto_dtype
def test_base_that_is_not_a_causal_lm_is_refused(tmp_path, text_file, capsys):
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "vit")
    code = main(["train", "--base", str(tmp_path / "vit"), "--data", str(text_file), "--out", str(tmp_path / "o")])
    assert code == 2 and "not a causal language model" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["activation_checkpointing", pytest.param("compile", marks=pytest.mark.slow)])
def test_memory_and_speed_options_train_the_same_adapter(tiny_base, text_file, tmp_path, option):
    """--activation-checkpointing recomputes, --compile fuses: the adapter must come out the same."""
    train(_config(tiny_base, text_file, tmp_path / "plain", steps=3))
    train(_config(tiny_base, text_file, tmp_path / "option", steps=3, **{option: True}))
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    other = load_file(tmp_path / "option" / "adapter_model.safetensors")
    assert plain.keys() == other.keys()
    for key in plain:
        assert torch.allclose(plain[key], other[key], atol=1e-5), key


@pytest.mark.parametrize(("kw", "on"), [({}, False), ({"quantize": "nf4"}, True),
                                        ({"quantize": "nf4", "activation_checkpointing": False}, False),
                                        ({"activation_checkpointing": True}, True)])
def test_qlora_checkpoints_activations_unless_told_not_to(tiny_base, text_file, tmp_path, kw, on):
    """QLoRA's recipe (a 7B base in 6 GB) by default; a given --[no-]activation-checkpointing wins."""
    assert _config(tiny_base, text_file, tmp_path / "o", **kw).activation_checkpointing is on


@pytest.mark.parametrize("kw", [{}, {"quantize": "nf4"}, {"quantize": "nf4", "activation_checkpointing": False},
                                {"activation_checkpointing": True, "dora": True, "r": 8, "lr": 0.01}])
def test_cli_args_give_the_config_back(tiny_base, text_file, tmp_path, kw):
    """--nproc hands each torchrun process cli_args(config): parsed again, it must be the same run."""
    from lorakit.cli import build_parser
    from lorakit.options import options
    from lorakit.train import cli_args

    config = _config(tiny_base, text_file, tmp_path / "o", **kw)
    args = build_parser("train").parse_args(["train", *cli_args(config)])
    assert TrainConfig(**options(args, TrainConfig)) == config


# ---- --full: a full fine-tune through the same loop ---------------------------------------------


def test_full_fine_tune_writes_a_model_transformers_loads(tiny_base, text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "full"
    summary = train(_config(tiny_base, text_file, out, full=True, steps=4, eval_data=text_file, eval_every=4,
                            lr=1e-3))
    assert summary["full"] and summary["adapter_bytes"] is None
    assert not (out / "adapter_config.json").exists() and not (out / "checkpoint").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert summary["trainable_params"] == summary["total_params"] == sum(p.numel() for p in base.parameters())
    assert summary["weights_bytes"] == (out / "model.safetensors").stat().st_size
    # every weight moved, the tied head with the embedding, and the model on disk is the one evaluated
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, base.get_parameter(name))]
    assert changed == [name for name, _ in base.named_parameters()]
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert AutoTokenizer.from_pretrained(out)("light").input_ids == AutoTokenizer.from_pretrained(tiny_base)("light").input_ids
    assert summary["eval_perplexity_adapted"] < summary["eval_perplexity_base"]


def test_full_fine_tune_resumes_bit_exactly(tiny_base, text_file, tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(tiny_base, text_file, straight, full=True))
    result = train(_config(tiny_base, text_file, resumed, full=True), should_stop=lambda step: step == 3)
    assert result["interrupted"] and (resumed / "checkpoint" / "model.safetensors").is_file()
    train(_config(tiny_base, text_file, resumed, full=True, resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_replaces_a_full_model_with_an_adapter(tiny_base, text_file, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_base, text_file, out, full=True, steps=2))
    train(_config(tiny_base, text_file, out, steps=2, overwrite=True))
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "nf4"], "leave out --quantize"),
    (["--r", "8"], "--r sets up an adapter"),
    (["--targets", "q_proj"], "--targets sets up an adapter"),
    (["--init-from", "{data}"], "--init-from continues an adapter"),
    (["--trainable-tokens", "5"], "--trainable-tokens sets up an adapter"),
])
def test_full_refuses_adapter_options(tiny_base, text_file, tmp_path, capsys, flags, message):
    flags = [f.format(data=text_file) for f in flags]
    code = main(["train", "--full", "--base", str(tiny_base), "--data", str(text_file), "--out", str(tmp_path / "o"),
                 "--dtype", "fp32", "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_trainable_tokens_train_those_embedding_rows_and_peft_loads_the_adapter(tiny_base, text_file, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit

    out = tmp_path / "run"
    eos = AutoTokenizer.from_pretrained(tiny_base).eos_token  # a token by name; 5 by id
    assert main(["train", "--base", str(tiny_base), "--data", str(text_file), "--out", str(out), "--steps", "4",
                 "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32", "--quiet", "--lr", "1e-2",
                 "--trainable-tokens", f"5,{eos}"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = [5, AutoTokenizer.from_pretrained(tiny_base).eos_token_id]
    assert config["trainable_token_indices"] == ids
    assert "lm_head" not in config["target_modules"]  # tied to the embedding: it shares the rows instead
    rows = load_file(out / "adapter_model.safetensors")
    (key,) = [k for k in rows if k.endswith("token_adapter.trainable_tokens_delta")]
    embedding = base.get_input_embeddings().weight
    assert rows[key].shape == (2, embedding.shape[1]) and not torch.allclose(rows[key], embedding[ids])  # trained
    x = torch.tensor([[1, 5, 9, ids[1], 5, 3]])
    ours = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    lorakit.load_adapter(ours, out)
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)
        with lorakit.disable_adapters(ours):
            plain = ours(x).logits
    assert not torch.allclose(plain, theirs(x).logits)  # the rows change what the model says


@pytest.mark.parametrize("value, message", [
    ("", "has an empty item"),
    ("5,,6", "has an empty item"),
    ("5,5", "token id 5 twice"),
    ("99999999999", "beyond any vocabulary"),
    ("5000", "token id 5000 is past this base's vocabulary"),
    ("light and", "tokens of this tokenizer, not one"),
])
def test_trainable_tokens_refused_in_one_line(tiny_base, text_file, tmp_path, capsys, value, message):
    code = main(["train", "--base", str(tiny_base), "--data", str(text_file), "--out", str(tmp_path / "o"),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32", "--quiet",
                 "--trainable-tokens", value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_trainable_tokens_with_init_from_is_refused(tiny_base, text_file, tmp_path, capsys):
    code = main(["train", "--base", str(tiny_base), "--data", str(text_file), "--out", str(tmp_path / "o"),
                 "--init-from", str(tmp_path), "--trainable-tokens", "5", "--dtype", "fp32", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "drop one of them" in err and err.count("\n") == 1, err
