"""Hostile input on the command line: bad numbers, odd files, outputs in the way, for every command.

Each case asserts the promise of the CLI: exit code 2 with exactly one line on stderr, no traceback,
and the working directory and the shared inputs (base, adapter, data, grids) exactly as they were.
Cases run in-process on a tiny base (tests/conftest.py), so the table stays quick.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

import lorakit
from lorakit.base import load_base
from tests.conftest import randomize_adapters
from tests.hostile import assert_refused, assert_unchanged, run_cli, run_process, snapshot

GENERAL = "The cat sat on the mat. I saw the dog. I saw the mat. The dog saw a bird. A bird sat on a tree."
DOMAIN = "I saw a red cat. I saw the red dog."


@pytest.fixture(scope="module")
def assets(tiny_base, tmp_path_factory):
    """Inputs shared by every case (checked unchanged after each): a base, an adapter, data, bigram grids."""
    from lorakit.cli import main

    root = tmp_path_factory.mktemp("assets")
    model, _ = load_base(tiny_base, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, root / "adapter")
    (root / "data.txt").write_text((GENERAL + "\n") * 20)
    (root / "general.txt").write_text(GENERAL)
    (root / "domain.txt").write_text(DOMAIN)
    assert main(["bigram", "train", str(root / "general.txt"), "-o", str(root / "base.bigram")]) == 0
    assert main(["bigram", "adapt", str(root / "base.bigram"), str(root / "domain.txt"), "-o", str(root / "d.lora")]) == 0
    return {"base": Path(tiny_base), "root": root, "adapter": root / "adapter", "data": root / "data.txt",
            "grid": root / "base.bigram", "lora": root / "d.lora", "text": root / "general.txt"}


@dataclass
class Case:
    id: str
    argv: list[str]  # with {base} {adapter} {data} {grid} {lora} {text} {work} placeholders
    mentions: str | None = None  # a word the one line must contain (case-insensitive)
    setup: Callable[[Path], None] | None = None  # prepares the working directory
    code: int = 2
    env: dict = field(default_factory=dict)

    def __post_init__(self):
        pass


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda work: (work / name).mkdir(parents=True)


def _all(*setups) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        for s in setups:
            s(work)
    return setup


T = ["train", "--base", "{base}", "--data", "{data}", "--out", "{work}/run", "--quiet", "--steps", "2",
     "--batch-size", "2", "--seq-len", "16", "--dtype", "fp32"]
G = ["generate", "--base", "{base}", "--prompt", "The cat", "--max-new-tokens", "3", "--dtype", "fp32"]
E = ["eval", "--base", "{base}", "--data", "{data}", "--dtype", "fp32", "--max-batches", "1"]


def train(*extra):
    return [*T, *extra]


def gen(*extra):
    return [*G, *extra]


def ev(*extra):
    return [*E, *extra]


NUMBERS = [
    # train: every number must be finite and in range, refused before the base loads
    Case("train-lr-inf", train("--lr", "inf"), "--lr"),
    Case("train-lr-nan", train("--lr", "nan"), "--lr"),
    Case("train-lr-negative", train("--lr", "-0.001"), "--lr"),
    Case("train-lr-zero", train("--lr", "0"), "--lr"),
    Case("train-lr-word", train("--lr", "fast"), "--lr"),
    Case("train-weight-decay-nan", train("--weight-decay", "nan"), "--weight-decay"),
    Case("train-weight-decay-inf", train("--weight-decay", "inf"), "--weight-decay"),
    Case("train-weight-decay-negative", train("--weight-decay", "-1"), "--weight-decay"),
    Case("train-epochs-nan", ["train", "--base", "{base}", "--data", "{data}", "--out", "{work}/run", "--epochs", "nan"],
         "--epochs"),
    Case("train-epochs-inf", ["train", "--base", "{base}", "--data", "{data}", "--out", "{work}/run", "--epochs", "inf"],
         "--epochs"),
    Case("train-epochs-zero", train("--epochs", "0"), "--epochs"),
    Case("train-warmup-nan", train("--warmup", "nan"), "--warmup"),
    Case("train-warmup-one", train("--warmup", "1"), "--warmup"),
    Case("train-dropout-nan", train("--dropout", "nan"), "dropout"),
    Case("train-dropout-one", train("--dropout", "1"), "dropout"),
    Case("train-dropout-negative", train("--dropout", "-0.1"), "dropout"),
    Case("train-alpha-nan", train("--alpha", "nan"), "alpha"),
    Case("train-alpha-inf", train("--alpha", "inf"), "alpha"),
    Case("train-alpha-zero", train("--alpha", "0"), "alpha"),
    Case("train-r-zero", train("--r", "0"), "--r"),
    Case("train-r-negative", train("--r", "-3"), "--r"),
    Case("train-r-huge", train("--r", str(10**9)), "lower r"),
    Case("train-r-float", train("--r", "1.5"), "--r"),
    Case("train-max-grad-norm-nan", train("--max-grad-norm", "nan"), "--max-grad-norm"),
    Case("train-max-grad-norm-negative", train("--max-grad-norm", "-1"), "--max-grad-norm"),
    Case("train-max-grad-norm-inf", train("--max-grad-norm", "inf"), "--max-grad-norm"),
    Case("train-steps-zero", train("--steps", "0"), "--steps"),
    Case("train-steps-negative", train("--steps", "-4"), "--steps"),
    Case("train-seq-len-one", train("--seq-len", "1"), "--seq-len"),
    Case("train-seq-len-zero", train("--seq-len", "0"), "--seq-len"),
    Case("train-seq-len-over-context", train("--seq-len", "100000"), "--seq-len"),
    Case("train-batch-size-zero", train("--batch-size", "0"), "--batch-size"),
    Case("train-batch-size-huge", train("--batch-size", "10000000"), "--batch-size"),
    Case("train-grad-accum-zero", train("--grad-accum", "0"), "--grad-accum"),
    Case("train-grad-accum-huge", train("--grad-accum", "10000000"), "--grad-accum"),
    Case("train-checkpoint-every-zero", train("--checkpoint-every", "0"), "--checkpoint-every"),
    Case("train-eval-every-negative", train("--eval-every", "-1"), "--eval-every"),
    Case("train-seed-negative", train("--seed", "-1"), "--seed"),
    Case("train-seed-huge", train("--seed", str(2**64)), "--seed"),
    Case("train-dtype-unknown", train("--dtype", "fp8"), "dtype"),
    Case("train-quantize-unknown", train("--quantize", "int8"), "--quantize nf4"),
    Case("train-checkpointing-with-a-value", train("--activation-checkpointing=yes"), "--no-activation-checkpointing"),
    Case("train-targets-empty", train("--targets", ""), "target"),
    Case("train-targets-bad-regex", train("--targets", "(q_proj"), "target"),
    Case("train-targets-no-match", train("--targets", "nothing_here"), "target_modules"),
    Case("train-labels-unknown", train("--labels", "some"), "labels"),
    Case("train-nproc-zero", train("--nproc", "0"), "--nproc"),
    Case("train-fsdp-one-process", train("--fsdp"), "--nproc"),  # nothing to shard across: refused, not ignored
    Case("train-fsdp-nproc-one", train("--fsdp", "--nproc", "1"), "--nproc"),  # before torchrun starts
    Case("train-fsdp-full", train("--fsdp", "--full"), "--full"),
    Case("train-resume-and-overwrite", train("--resume", "--overwrite"), "--resume"),
    # eval
    Case("eval-onednn-env-bad", ev(), "LORAKIT_ONEDNN_FP32", env={"LORAKIT_ONEDNN_FP32": "on"}),
    Case("eval-batch-size-zero", ev("--batch-size", "0"), "--batch-size"),
    Case("eval-batch-size-negative", ev("--batch-size", "-2"), "--batch-size"),
    Case("eval-seq-len-zero", ev("--seq-len", "0"), "--seq-len"),
    Case("eval-seq-len-negative", ev("--seq-len", "-5"), "--seq-len"),
    Case("eval-seq-len-one", ev("--seq-len", "1"), "--seq-len"),
    Case("eval-max-batches-zero", ev("--max-batches", "0"), "--max-batches"),
    Case("eval-scales-nan", ev("--adapter", "{adapter}", "--scales", "0,nan"), "--scales"),
    Case("eval-scales-inf", ev("--adapter", "{adapter}", "--scales", "inf"), "--scales"),
    Case("eval-scales-words", ev("--adapter", "{adapter}", "--scales", "a,b"), "--scales"),
    Case("eval-dtype-unknown", ev("--dtype", "int4"), "dtype"),
    Case("eval-quantize-unknown", ev("--quantize", "int8"), "--quantize nf4"),
    Case("eval-adapter-scale-nan", ev("--adapter", "{adapter}:nan"), "scale"),
    # generate
    Case("generate-onednn-env-bad", gen(), "LORAKIT_ONEDNN_FP32", env={"LORAKIT_ONEDNN_FP32": "yes"}),
    Case("generate-packed-env-bad", gen(), "LORAKIT_PACKED_WEIGHTS", env={"LORAKIT_PACKED_WEIGHTS": "2"}),
    Case("generate-temperature-nan", gen("--temperature", "nan"), "--temperature"),
    Case("generate-temperature-inf", gen("--temperature", "inf"), "--temperature"),
    Case("generate-temperature-negative", gen("--temperature", "-1"), "--temperature"),
    Case("generate-top-p-nan", gen("--top-p", "nan"), "--top-p"),
    Case("generate-top-p-zero", gen("--top-p", "0"), "--top-p"),
    Case("generate-top-p-over-one", gen("--top-p", "1.5"), "--top-p"),
    Case("generate-top-k-negative", gen("--top-k", "-1"), "--top-k"),
    Case("generate-max-new-tokens-zero", gen("--max-new-tokens", "0"), "--max-new-tokens"),
    Case("generate-seed-negative", gen("--seed", "-1"), "--seed"),
    Case("generate-adapter-scale-inf", gen("--adapter", "{adapter}:inf"), "scale"),
    Case("generate-adapter-scale-nan", gen("--adapter", "{adapter}:nan"), "scale"),
    Case("generate-prompt-empty", ["generate", "--base", "{base}", "--prompt", ""], "--prompt"),
    Case("generate-compare-without-adapter", gen("--compare"), "--compare"),
    Case("generate-quantize-unknown", gen("--quantize", "int8"), "--quantize nf4"),
    # merge / combine / quantize / inspect / diff
    Case("merge-dtype-unknown", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{work}/m",
                                 "--dtype", "fp8"], "dtype"),
    Case("merge-scale-nan", ["merge", "--base", "{base}", "--adapter", "{adapter}:nan", "--out", "{work}/m"], "scale"),
    Case("merge-scale-inf", ["merge", "--base", "{base}", "--adapter", "{adapter}:inf", "--out", "{work}/m"], "scale"),
    Case("combine-weight-nan", ["combine", "{adapter}:nan", "--out", "{work}/c"], "finite"),
    Case("combine-weight-inf", ["combine", "{adapter}:inf", "--out", "{work}/c"], "finite"),
    Case("combine-rank-zero", ["combine", "{adapter}", "--out", "{work}/c", "--rank", "0"], "rank"),
    Case("combine-density-nan", ["combine", "{adapter}", "--method", "ties", "--out", "{work}/c", "--density", "nan"],
         "density"),
    Case("combine-density-two", ["combine", "{adapter}", "--method", "ties", "--out", "{work}/c", "--density", "2"],
         "density"),
    Case("combine-method-unknown", ["combine", "{adapter}", "--out", "{work}/c", "--method", "average"], "method"),
    Case("combine-seed-negative", ["combine", "{adapter}", "--method", "dare_linear", "--density", "0.5",
                                   "--out", "{work}/c", "--seed", "-1"], "seed"),
    Case("quantize-blocksize-zero", ["quantize", "--base", "{base}", "--out", "{work}/q", "--blocksize", "0"],
         "blocksize"),
    Case("quantize-blocksize-negative", ["quantize", "--base", "{base}", "--out", "{work}/q", "--blocksize", "-64"],
         "blocksize"),
    Case("quantize-blocksize-huge", ["quantize", "--base", "{base}", "--out", "{work}/q", "--blocksize", str(10**12)],
         "blocksize"),
    Case("diff-top-negative", ["diff", "--base", "{base}", "--adapter", "{adapter}", "--prompts", "The cat",
                               "--top", "-5"], "--top"),
    Case("diff-seq-len-zero", ["diff", "--base", "{base}", "--adapter", "{adapter}", "--data", "{data}",
                               "--seq-len", "0"], "--seq-len"),
    Case("diff-max-contexts-zero", ["diff", "--base", "{base}", "--adapter", "{adapter}", "--data", "{data}",
                                    "--max-contexts", "0"], "--max-contexts"),
    Case("diff-scale-nan", ["diff", "--base", "{base}", "--adapter", "{adapter}:nan", "--prompts", "The cat"], "scale"),
    Case("demo-steps-zero", ["demo", "--steps", "0", "--out", "{work}/d"], "--steps"),
    Case("demo-corpus-unknown", ["demo", "--corpus", "nope", "--out", "{work}/d"], "corpus"),
    # serve (refused before anything loads)
    Case("serve-port-too-big", ["serve", "--port", "70000"], "--port"),
    Case("serve-port-negative", ["serve", "--port", "-1"], "--port"),
    Case("serve-api-key-empty", ["serve", "--api-key", ""], "--api-key"),
    Case("serve-api-key-env-empty", ["serve"], "LORAKIT_API_KEY", env={"LORAKIT_API_KEY": ""}),
    Case("serve-max-tokens-zero", ["serve", "--max-tokens", "0"], "--max-tokens"),
    Case("serve-onednn-env-bad", ["serve", "--port", "47931"], "LORAKIT_ONEDNN_FP32", env={"LORAKIT_ONEDNN_FP32": "x"}),
    Case("serve-max-waiting-zero", ["serve", "--max-waiting", "0"], "--max-waiting"),
    Case("serve-max-adapters-zero", ["serve", "--max-adapters", "0"], "--max-adapters"),
    Case("serve-dtype-unknown", ["serve", "--dtype", "fp8"], "dtype"),
    Case("serve-quantize-unknown", ["serve", "--quantize", "int8"], "--quantize nf4"),
    Case("serve-port-zero", ["serve", "--port", "0"], "--port"),
    Case("serve-adapter-bad-name", ["serve", "--adapter", "bad name={adapter}"], "not allowed"),
    Case("serve-adapter-same-name-twice", ["serve", "--adapter", "a={adapter}", "--adapter", "a={adapter}"], "twice"),
    Case("serve-adapter-symlink-loop", ["serve", "--adapter", "{work}/loop"], "loop",
         setup=lambda w: os.symlink(w / "loop", w / "loop")),
    Case("serve-adapter-dir-is-file", ["serve", "--adapter-dir", "{work}/f"], "--adapter-dir", setup=_write("f", "x")),
    Case("serve-adapter-bad-file", ["serve", "--adapter", "a={work}/a", "--dtype", "fp32"], "adapter_model.safetensors",
         setup=_all(_mkdir("a"), _write("a/adapter_config.json", "[1]"))),
    Case("serve-too-many-adapters", ["serve", "--adapter", "a={adapter}", "--adapter", "b={adapter}",
                                     "--max-adapters", "1"], "--max-adapters"),
    Case("serve-host-unknown", ["serve", "--host", "no such host!"], "--host"),
    # bigram
    Case("bigram-sample-n-negative", ["bigram", "sample", "{grid}", "-n", "-1"], "-n"),
    Case("bigram-sample-seed-negative", ["bigram", "sample", "{grid}", "--seed", "-1"], "--seed"),
    Case("bigram-sample-seed-float", ["bigram", "sample", "{grid}", "--seed", "1.5"], "--seed"),
    Case("bigram-sample-smoothing-nan", ["bigram", "sample", "{grid}", "--smoothing", "nan"], "smoothing"),
    Case("bigram-sample-scale-nan", ["bigram", "sample", "{grid}", "--lora", "{lora}:nan"], "scale"),
    Case("bigram-sample-scale-inf", ["bigram", "sample", "{grid}", "--lora", "{lora}:inf"], "scale"),
    Case("bigram-show-top-negative", ["bigram", "show", "{grid}", "--row", "saw", "--top", "-5"], "--top"),
    Case("bigram-show-top-zero", ["bigram", "show", "{grid}", "--row", "saw", "--top", "0"], "--top"),
    Case("bigram-diff-top-negative", ["bigram", "diff", "{grid}", "{lora}", "--top", "-5"], "--top"),
    Case("bigram-eval-smoothing-zero", ["bigram", "eval", "{grid}", "{text}", "--smoothing", "0"], "smoothing"),
    Case("bigram-eval-smoothing-nan", ["bigram", "eval", "{grid}", "{text}", "--smoothing", "nan"], "smoothing"),
    Case("bigram-eval-factors-nan", ["bigram", "eval", "{grid}", "{text}", "--factors", "nan"], "--factors"),
    Case("bigram-eval-fractions-two", ["bigram", "eval", "{grid}", "{text}", "--lora", "{lora}", "--curve", "{text}",
                                       "--fractions", "2"], "fractions"),
    Case("bigram-eval-curve-scale-nan", ["bigram", "eval", "{grid}", "{text}", "--lora", "{lora}", "--curve",
                                         "{text}", "--curve-scale", "nan"], "scale"),
    Case("bigram-eval-plot-without-curve", ["bigram", "eval", "{grid}", "{text}", "--plot", "{work}/p.png"], "--curve"),
    # argparse itself: unknown flags and missing values are one line too
    Case("unknown-command", ["trian"], "trian"),
    Case("unknown-flag", train("--learning-rate", "1"), "--learning-rate"),
    Case("missing-value", ["train", "--data"], "--data"),
    Case("missing-required", ["train", "--data", "{data}"], "--out"),
    Case("bigram-missing-subcommand", ["bigram"], "subcommand"),
]


FILES = [
    # data files
    Case("data-missing", train("--data", "{work}/nope.txt"), "not found"),
    Case("data-empty", train("--data", "{work}/e.txt"), "empty", setup=_write("e.txt", "")),
    Case("data-binary", train("--data", "{work}/b.txt"), "binary", setup=_write("b.txt", bytes(range(256)) * 8)),
    Case("data-utf16", train("--data", "{work}/b.txt"), "binary", setup=_write("b.txt", (GENERAL * 5).encode("utf-16"))),
    Case("data-directory", train("--data", "{work}/d"), "regular file", setup=_mkdir("d")),
    Case("data-unknown-extension", train("--data", "{work}/d.csv"), "format", setup=_write("d.csv", "a,b\n")),
    Case("data-jsonl-broken-line", train("--data", "{work}/d.jsonl"), "broken JSON",
         setup=_write("d.jsonl", '{"text": "fine"}\n{"text": \n')),
    Case("data-jsonl-list-line", train("--data", "{work}/d.jsonl"), "object", setup=_write("d.jsonl", "[1, 2]\n")),
    Case("data-jsonl-text-number", train("--data", "{work}/d.jsonl"), "text", setup=_write("d.jsonl", '{"text": 5}\n')),
    Case("data-jsonl-no-known-key", train("--data", "{work}/d.jsonl"), "record needs",
         setup=_write("d.jsonl", '{"body": "x"}\n')),
    Case("data-jsonl-label-odd", train("--data", "{work}/d.jsonl"), "label",
         setup=_write("d.jsonl", '{"text": "x", "label": "meh"}\n')),
    Case("data-jsonl-messages-not-list", train("--data", "{work}/d.jsonl"), "messages",
         setup=_write("d.jsonl", '{"messages": "hi"}\n')),
    Case("data-jsonl-messages-role-odd", train("--data", "{work}/d.jsonl"), "role",
         setup=_write("d.jsonl", '{"messages": [{"role": "wizard", "content": "x"}]}\n')),
    Case("data-jsonl-no-assistant", train("--data", "{work}/d.jsonl"), "assistant",
         setup=_write("d.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n')),
    Case("data-jsonl-prompt-number", train("--data", "{work}/d.jsonl"), "strings",
         setup=_write("d.jsonl", '{"prompt": 1, "completion": "x"}\n')),
    Case("data-jsonl-huge-number", train("--data", "{work}/d.jsonl"), "d.jsonl:1",
         setup=_write("d.jsonl", '{"text": "x", "n": ' + "9" * 5000 + "}\n")),
    Case("data-jsonl-deep-nesting", train("--data", "{work}/d.jsonl"), "d.jsonl:1",
         setup=_write("d.jsonl", '{"text": "x", "n": ' + "[" * 100000 + "]" * 100000 + "}\n")),
    Case("data-jsonl-not-utf8", train("--data", "{work}/d.jsonl"), "UTF-8", setup=_write("d.jsonl", b'{"text": "\xff"}\n')),
    Case("data-jsonl-only-blank", train("--data", "{work}/d.jsonl"), "no records", setup=_write("d.jsonl", "\n\n")),
    Case("data-symlink-loop", train("--data", "{work}/loop.txt"), "loop",
         setup=lambda w: os.symlink(w / "loop.txt", w / "loop.txt")),
    Case("eval-data-missing", ev("--data", "{work}/nope.txt"), "not found"),
    Case("eval-data-directory", ev("--data", "{work}/d"), "regular file", setup=_mkdir("d")),
    Case("diff-data-missing", ["diff", "--base", "{base}", "--adapter", "{adapter}", "--data", "{work}/n.txt"],
         "not found"),
    # bases
    Case("base-missing", gen("--base", "{work}/nobase"), "not found"),
    Case("base-no-config", gen("--base", "{work}/b"), "config.json", setup=_mkdir("b")),
    Case("base-config-list", gen("--base", "{work}/b"), "config.json", setup=_write("b/config.json", "[1, 2]")),
    Case("base-config-broken", gen("--base", "{work}/b"), "config.json", setup=_write("b/config.json", "{nope")),
    Case("base-config-unknown-type", gen("--base", "{work}/b"), "b", setup=_write("b/config.json",
                                                                                  '{"model_type": "nonsense"}')),
    Case("base-is-file", gen("--base", "{work}/b"), "b", setup=_write("b", "x")),
    # outputs in the way (checked before any work)
    Case("train-out-is-file", train("--out", "{work}/f"), "--out", setup=_write("f", "keep me")),
    Case("train-out-parent-is-file", train("--out", "{work}/f/run"), "--out", setup=_write("f", "keep me")),
    Case("train-out-exists", train("--out", "{work}/o"), "--overwrite", setup=_write("o/x", "keep me")),
    Case("train-resume-nothing", train("--out", "{work}/o", "--resume"), "resume", setup=_mkdir("o")),
    Case("train-out-unwritable", train("--out", "/proc/lorakit-run"), "--out"),
    Case("merge-out-is-file", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{work}/f"], "f",
         setup=_write("f", "keep me")),
    Case("merge-out-not-a-model", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{work}/o",
                                   "--overwrite"], "model", setup=_write("o/x", "keep me")),
    Case("merge-out-parent-is-file", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{work}/f/m"],
         "f", setup=_write("f", "keep me")),
    Case("combine-out-is-file", ["combine", "{adapter}", "--out", "{work}/f"], "f", setup=_write("f", "keep me")),
    Case("combine-out-holds-adapter", ["combine", "{adapter}", "--out", "{adapter}"], "--overwrite"),
    Case("quantize-out-is-file", ["quantize", "--base", "{base}", "--out", "{work}/f"], "f", setup=_write("f", "keep")),
    Case("inspect-plot-is-directory", ["inspect", "{adapter}", "--plot", "{work}/p"], "--plot", setup=_mkdir("p")),
    Case("inspect-plot-parent-is-file", ["inspect", "{adapter}", "--plot", "{work}/f/p.png"], "f",
         setup=_write("f", "keep me")),
    Case("diff-plot-is-directory", ["diff", "--base", "{base}", "--adapter", "{adapter}", "--prompts", "The cat",
                                    "--plot", "{work}/p"], "--plot", setup=_mkdir("p")),
    Case("bigram-train-out-is-directory", ["bigram", "train", "{text}", "-o", "{work}/d"], "d", setup=_mkdir("d")),
    Case("bigram-train-out-parent-missing", ["bigram", "train", "{text}", "-o", "{work}/no/g.bigram"], "no"),
    Case("bigram-adapt-onto-its-base", ["bigram", "adapt", "{work}/g.bigram", "{text}", "-o", "{work}/g.bigram"],
         "base", setup=lambda w: shutil.copy(w.parent / "assets-link" / "base.bigram", w / "g.bigram")),
    Case("bigram-adapt-onto-its-text", ["bigram", "adapt", "{grid}", "{work}/t.txt", "-o", "{work}/t.txt"], "t.txt",
         setup=_write("t.txt", DOMAIN)),
    Case("bigram-train-onto-its-text", ["bigram", "train", "{work}/t.txt", "-o", "{work}/t.txt"], "t.txt",
         setup=_write("t.txt", GENERAL)),
    Case("bigram-diff-plot-is-directory", ["bigram", "diff", "{grid}", "{lora}", "--plot", "{work}/p"], "p",
         setup=_mkdir("p")),
    # bigram files
    Case("bigram-grid-missing", ["bigram", "sample", "{work}/none.bigram"], "none.bigram"),
    Case("bigram-grid-garbage", ["bigram", "sample", "{work}/g.bigram"], "grid", setup=_write("g.bigram", b"\x00" * 64)),
    Case("bigram-grid-is-directory", ["bigram", "sample", "{work}/g"], "g", setup=_mkdir("g")),
    Case("bigram-lora-as-base", ["bigram", "sample", "{lora}"], "lora"),
    Case("bigram-base-as-lora", ["bigram", "sample", "{grid}", "--lora", "{grid}"], "base"),
    Case("bigram-text-binary", ["bigram", "train", "{work}/b.txt", "-o", "{work}/g.bigram"], "binary",
         setup=_write("b.txt", b"ab\x00cd")),
    Case("bigram-text-no-words", ["bigram", "train", "{work}/b.txt", "-o", "{work}/g.bigram"], "words",
         setup=_write("b.txt", "... !!! ???")),
    Case("bigram-text-fifo", ["bigram", "train", "{work}/f.txt", "-o", "{work}/g.bigram"], "f.txt",
         setup=lambda w: os.mkfifo(w / "f.txt")),
    Case("bigram-vocab-without-boundary", ["bigram", "sample", "{work}/g.bigram"], "damaged",
         setup=lambda w: _grid(w, "g.bigram", vocab=lambda v: v[1:] + v[:1])),
    Case("bigram-vocab-repeats-a-word", ["bigram", "sample", "{work}/g.bigram"], "damaged",
         setup=lambda w: _grid(w, "g.bigram", vocab=lambda v: v[:-1] + v[-2:-1])),
    Case("bigram-vocab-not-a-list", ["bigram", "sample", "{work}/g.bigram"], "damaged",
         setup=lambda w: _grid(w, "g.bigram", meta={"vocab": '{"a": 1}'})),
    Case("bigram-vocab-deep-nesting", ["bigram", "sample", "{work}/g.bigram"], "damaged",
         setup=lambda w: _grid(w, "g.bigram", meta={"vocab": "[" * 100000 + "]" * 100000})),
    Case("bigram-format-version-2", ["bigram", "sample", "{work}/g.bigram"], "version",
         setup=lambda w: _grid(w, "g.bigram", meta={"format_version": "2"})),
    Case("bigram-counts-negative", ["bigram", "sample", "{work}/g.bigram"], "damaged",
         setup=lambda w: _grid(w, "g.bigram", arrays={"counts": lambda c: -c})),
    Case("bigram-index-out-of-range", ["bigram", "sample", "{work}/g.bigram"], "damaged",
         setup=lambda w: _grid(w, "g.bigram", arrays={"cols": lambda c: c + 10**6})),
    Case("bigram-arrays-disagree", ["bigram", "sample", "{work}/g.bigram"], "damaged",
         setup=lambda w: _grid(w, "g.bigram", arrays={"cols": lambda c: c[:-1]})),
    Case("bigram-lora-size-superscript-digit", ["bigram", "sample", "{grid}", "--lora", "{work}/d.lora"], "damaged",
         setup=lambda w: _grid(w, "d.lora", source="d.lora", meta={"base_vocab_size": "1²"})),
    Case("bigram-lora-size-huge", ["bigram", "sample", "{grid}", "--lora", "{work}/d.lora"], "d.lora",
         setup=lambda w: _grid(w, "d.lora", source="d.lora", meta={"base_vocab_size": "9" * 5000})),
    Case("bigram-lora-extra-repeats", ["bigram", "sample", "{grid}", "--lora", "{work}/d.lora"], "damaged",
         setup=lambda w: _grid(w, "d.lora", source="d.lora", meta={"extra_vocab": '["x", "x"]'})),
    Case("bigram-show-row-two-words", ["bigram", "show", "{grid}", "--row", "two words"], "--row"),
    Case("bigram-lora-for-other-base", ["bigram", "sample", "{work}/o.bigram", "--lora", "{lora}"], "base",
         setup=lambda w: __import__("lorakit.cli").cli.main(
             ["bigram", "train", str(w.parent / "assets-link" / "domain.txt"), "-o", str(w / "o.bigram")])),
    # adapters given on the command line
    Case("adapter-missing", gen("--adapter", "{work}/none"), "none"),
    Case("adapter-is-file", gen("--adapter", "{work}/f"), "f", setup=_write("f", "x")),
    Case("adapter-symlink-loop", gen("--adapter", "{work}/loop"), "loop",
         setup=lambda w: os.symlink(w / "loop", w / "loop")),
    Case("inspect-adapter-symlink-loop", ["inspect", "{work}/loop"], "loop",
         setup=lambda w: os.symlink(w / "loop", w / "loop")),
    Case("inspect-adapter-missing", ["inspect", "{work}/none"], "none"),
    Case("combine-adapter-missing", ["combine", "{work}/none", "--out", "{work}/c"], "none"),
]


def _grid(work: Path, name: str, source: str = "base.bigram", meta: dict | None = None, vocab=None,
          arrays: dict | None = None) -> None:
    """A copy of a shipped-in-the-test grid file with its header or arrays changed (fingerprint kept in step
    with a changed vocabulary, as a careful forger would)."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from lorakit.bigram.model import vocab_fingerprint

    with safe_open(str(work.parent / "assets-link" / source), framework="numpy") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if vocab is not None:
        words = vocab(json.loads(header["vocab"]))
        header["vocab"], header["vocab_fingerprint"] = json.dumps(words), vocab_fingerprint(words)
    header.update(meta or {})
    for key, change in (arrays or {}).items():
        tensors[key] = np.ascontiguousarray(change(tensors[key]))
    save_file(tensors, str(work / name), metadata=header)


def _fill(argv: list[str], assets: dict, work: Path) -> list[str]:
    names = {k: str(v) for k, v in assets.items()} | {"work": str(work)}
    return [a.format(**names) for a in argv]


@pytest.fixture
def workdir(tmp_path, assets):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "assets-link").symlink_to(assets["root"])
    yield work
    for path in work.rglob("*"):  # read-only dirs made by a case must not stop the cleanup
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o700)


TABLE = [pytest.param(c, id=c.id) for c in NUMBERS + FILES]


@pytest.mark.parametrize("case", TABLE)
def test_cli_refuses_in_one_line(case, assets, workdir, monkeypatch):
    import uvicorn

    def no_server(*a, **k):  # a serve case that got this far would block: fail it instead
        raise AssertionError("the server was about to start")

    monkeypatch.setattr(uvicorn, "run", no_server)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.setup is not None:
        case.setup(workdir)
    before, shared = snapshot(workdir), snapshot(assets["root"])
    base = snapshot(assets["base"])
    run = run_cli(_fill(case.argv, assets, workdir), cwd=workdir)
    assert_refused(run, case.code, case.mentions)
    assert_unchanged(before, snapshot(workdir))
    assert_unchanged(shared, snapshot(assets["root"]))
    assert_unchanged(base, snapshot(assets["base"]))


def test_a_fifo_as_data_is_refused_not_read(assets, workdir):
    """A FIFO would block the reader forever: refused by kind, before anything opens it (a real process)."""
    os.mkfifo(workdir / "d.txt")
    run = run_process(_fill(train("--data", "{work}/d.txt"), assets, workdir), cwd=workdir, timeout=120)
    assert_refused(run, 2, "regular file")
