"""`lorakit train`: train one adapter on a frozen base. Reads top to bottom: setup, loop, save.

    lorakit train --data my_domain.txt --out adapters/mine
    lorakit train --base ~/models/llama --data chats.jsonl --r 16 --targets all-linear --out adapters/x
    lorakit train --base ~/models/big --quantize nf4 --data d.jsonl --out adapters/q     # QLoRA
    lorakit train --objective kto --data judged.jsonl --init-from adapters/sft --out adapters/kto  # good/bad labels
    lorakit train --full --data my_domain.txt --out models/mine      # full fine-tune: every weight trains
    lorakit train --nproc 2 --fsdp --base ~/models/big --data d.jsonl --out adapters/x   # base sharded over 2 processes

Writes into --out: the adapter (PEFT layout; with --full a transformers model directory) at the end, `metrics.jsonl` as it goes, `loss.png`,
`training_summary.json`, and `checkpoint/` every --checkpoint-every steps (adapter, optimizer,
scheduler, RNG and data position). `--resume` continues from it and ends with the same adapter an
uninterrupted run would give. Ctrl-C finishes the current step, checkpoints, and prints how to resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lorakit import distributed, heap, products
from lorakit.adapters import ALL_LINEAR, ALL_LINEAR_HEAD, disable_adapters, inject, lora_layers, trainable_parameters
from lorakit.base import autocast, base_name, load_base, quantize_option, quantize_spec, resolve_dtype
from lorakit.checkpoint import has_checkpoint, load_checkpoint, rng_state, save_checkpoint
from lorakit.config import LoraConfig
from lorakit.data import batch_at, load_examples
from lorakit.errors import UserError
from lorakit.evaluate import mean_nll, perplexity
from lorakit.export import fresh_tokenizer
from lorakit.files import atomic_write_bytes, check_output, open_regular, previous_directory
from lorakit.io import load_adapter, save_adapter
from lorakit.loraplus import loraplus_groups
from lorakit.modules import parse_names
from lorakit.nf4 import BaseMemory, base_memory
from lorakit.objectives import DPO, KTO, OBJECTIVES, REFERENCE_ADAPTER, SFT, Preference, add_reference
from lorakit.options import add_options, option, options
from lorakit.plots import plot_loss
from lorakit.preferences import load_preferences
from lorakit.tokens import check_ids

# Default peak learning rates: an adapter, and every weight with --full. With the default targets
# (every linear layer and the output head) these were chosen by `lorakit sweep` on the shipped corpora and
# on one we do not ship: docs/quality.md has the table.
LORA_LR = 2e-3
FULL_LR = 1e-3
DEFAULT_TARGETS = ALL_LINEAR_HEAD


@dataclass
class TrainConfig:
    """Everything `lorakit train` takes; each field's help is the CLI's --help."""

    data: Path = option("training data: .txt, or .jsonl with text / prompt+completion / messages records "
                        "(--objective kto: + label; dpo: prompt, chosen, rejected)")
    out: Path = option("output directory for the adapter, metrics, plot and checkpoints")
    base: str | None = option("base model directory or hub id (default: the embedded base)", default=None)
    r: int = option("LoRA rank", default=16)
    alpha: float = option("LoRA alpha; the update is scaled by alpha / r", default=32.0)
    dropout: float = option("dropout on the adapter input", default=0.0)
    targets: str = option("modules to adapt: comma-separated names, a regex, all-linear (every linear layer but the "
                          "output head, as PEFT) or all-linear+head (and the output head: it learns a domain's "
                          "words fastest; docs/quality.md; --init pissa/olora leave a tied head out)",
                          default=DEFAULT_TARGETS)
    dora: bool = option("DoRA (weight-decomposed LoRA, PEFT's use_dora): also learn a magnitude per output feature "
                        "of each adapted weight, which rescales the direction W + s·B·A; often closer to full "
                        "fine-tuning at low rank, for a 1.1-1.3x slower step; measured here at r=16 it matched plain "
                        "LoRA (docs/variants.md)", default=False)
    trainable_tokens: str | None = option("tokens whose rows of the input embedding train in full beside the adapter "
                                          "(PEFT's trainable_token_indices): comma-separated ids (32000,32001) or "
                                          "tokens of the base's tokenizer ('<|im_start|>,<|im_end|>'), e.g. new or "
                                          "special tokens, which a low-rank update learns slowly; a tied output head "
                                          "shares those rows (and so leaves the default targets)", default=None)
    lr: float | None = option(f"peak learning rate (linear warmup, then cosine decay to 10%); default {LORA_LR:g} "
                              f"for an adapter, {FULL_LR:g} with --full", default=None)
    init: str = option("how A and B start: lora (A random, B zero: the base at first), gaussian, orthogonal, pissa "
                       "(the base weight's top-r singular directions), pissa_niter_N (the same by a randomised SVD of N "
                       "iterations, faster), olora (its QR). pissa and olora move that part out of the base weights "
                       "while training; the saved adapter is converted, as PEFT does, to a plain LoRA adapter of rank "
                       "2r that applies to the original base. pissa learns faster and forgets more, as a higher --lr "
                       "does (docs/variants.md)", default="lora")
    lr_ratio: float | None = option("LoRA+: B's learning rate is --lr times this (A's stays --lr; DoRA magnitudes and "
                                    "biases go with B), as PEFT's create_loraplus_optimizer; the paper suggests 16. "
                                    "Learns faster and forgets more, as a higher --lr does (docs/variants.md)",
                                    default=None)
    lr_embedding: float = option("LoRA+ only: the learning rate of LoRA on Embedding layers (PEFT's "
                                 "loraplus_lr_embedding)", default=1e-6)
    warmup: float = option("warmup length as a fraction of all steps", default=0.05)
    steps: int | None = option("optimizer steps (default: from --epochs)", default=None)
    epochs: float = option("passes over the data when --steps is not given", default=1.0)
    batch_size: int = option("rows per micro-batch", default=8)
    grad_accum: int = option("micro-batches per optimizer step", default=1)
    seq_len: int | None = option("tokens per row; text is packed to exactly this (default: 256, or the "
                                "model's maximum if smaller)", default=None)
    eval_data: Path | None = option("held-out data for perplexity at intervals", default=None)
    eval_every: int = option("evaluate every N steps (and at the end)", default=50)
    eval_batches: int = option("evaluate on at most N batches", default=20)
    seed: int = option("random seed (init, data order, dropout)", default=0)
    init_from: Path | None = option("continue training this adapter on the new data", default=None)
    dtype: str = option("compute precision: auto (bf16 where fast), bf16, fp16 or fp32", default="auto")
    quantize: str | None = quantize_option()
    activation_checkpointing: bool | None = option(
        "recompute each layer's activations in the backward instead of keeping them: far less memory (measured: a "
        "quarter) for about 1.5x the time per step. Default: on with --quantize nf4 (QLoRA's recipe: a 7B base "
        "then trains in 6 GB), off otherwise", default=None)
    compile: bool = option("compile the model with torch.compile: the first step takes a minute or more longer, "
                          "later ones are ~10% faster (CPU, measured); worth it for long runs", default=False)
    checkpoint_every: int = option("write a checkpoint every N steps", default=100)
    labels: str = option("sft: which labelled records to train on: good (skip 'bad') or all", default="good")
    objective: str = option("what to learn: sft (the data's next tokens), kto (answers labelled good or bad: "
                           "raise the good, lower the bad), dpo (pairs: prefer chosen over rejected); kto and dpo "
                           "compare with the base, or with --init-from's adapter (docs/preferences.md)",
                           default="sft")
    beta: float = option("kto/dpo: how strongly the reference holds the adapted model (TRL's beta)", default=0.1)
    desirable_weight: float = option("kto: weight of the loss on good answers", default=1.0)
    undesirable_weight: float = option("kto: weight of the loss on bad answers (raise it when bad ones are "
                                      "fewer: TRL's advice is weights x counts about equal, within 4:3)", default=1.0)
    weight_decay: float = option("AdamW weight decay on adapter weights", default=0.0)
    max_grad_norm: float = option("clip the gradient norm to this (0: no clipping)", default=1.0)
    resume: bool = option("continue an interrupted run in --out from its checkpoint", default=False)
    overwrite: bool = option("replace an existing --out", default=False)
    quiet: bool = option("no progress bar", default=False)
    fsdp: bool = option("with several processes (--nproc N or torchrun): shard the frozen base across them "
                        "(PyTorch's FSDP2) instead of copying it to each: a rank holds about 1/N of it (measured "
                        "at N=2, also with --quantize nf4) and the adapter is the one DDP trains; each layer's "
                        "weights cross the network every step, slower on CPUs (docs/distributed.md)",
                        default=False)
    full: bool = option("full fine-tune instead of an adapter: every weight of the base trains (fp32 master weights) "
                        "and --out gets a complete transformers model directory (config, safetensors, tokenizer). "
                        "Memory: weights, gradients and AdamW's two moments, 16 bytes per parameter in fp32, "
                        "where LoRA adds that only for its own few parameters", default=False)

    def __post_init__(self) -> None:
        # Every value is checked here, before anything loads or any file is written.
        self.data, self.out = Path(self.data), Path(self.out)
        for name in ("data", "eval_data", "init_from"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists() and not Path(path).is_symlink():
                raise UserError(f"--{name.replace('_', '-')} {path} not found")
        if self.lr is None:
            self.lr = FULL_LR if self.full else LORA_LR
        for name in ("r", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.seq_len is not None and self.seq_len < 2:  # one token has no next token to learn
            raise UserError(f"--seq-len must be at least 2, got {self.seq_len}")
        for name, low, high, low_open in (("lr", 0, math.inf, True), ("alpha", 0, math.inf, True),
                                          ("epochs", 0, math.inf, True), ("weight_decay", 0, math.inf, False),
                                          ("max_grad_norm", 0, math.inf, False), ("warmup", 0, 1, False),
                                          ("dropout", 0, 1, False)):
            value = getattr(self, name)
            in_range = math.isfinite(value) and (value > low if low_open else value >= low) and value < high
            if not in_range:
                bounds = f"in [{low}, {high})" if high < math.inf else ("> 0" if low_open else ">= 0")
                raise UserError(f"--{name.replace('_', '-')} must be a finite number {bounds}, got {value}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"unknown dtype {self.dtype!r}; use one of auto, fp32, bf16, fp16")
        if self.labels not in ("good", "all"):
            raise UserError(f"--labels must be 'good' or 'all', got {self.labels!r}")
        if not (self.init in ("lora", "gaussian", "orthogonal", "pissa", "olora")
                or re.fullmatch(r"pissa_niter_[1-9]\d*", self.init)):
            raise UserError(f"--init {self.init} is not one of lora, gaussian, orthogonal, pissa, pissa_niter_N, olora")
        for name in ("lr_ratio", "lr_embedding"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        token_items(self.trainable_tokens)  # --trainable-tokens checked (tokens by name: once the tokenizer loads)
        if self.trainable_tokens is not None and self.init_from is not None:
            raise UserError("--trainable-tokens sets up a new adapter, and --init-from continues one with the token "
                            "rows its own config names; drop one of them")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        quantize_spec(self.quantize)  # --quantize checked
        if self.activation_checkpointing is None:  # decided here, so that --resume compares what ran
            self.activation_checkpointing = self.quantize is not None
        if self.fsdp:
            self._check_fsdp()
        if self.full:
            self._check_full()
        else:
            self.lora_config()  # --targets (and the rest of the adapter's shape) checked too
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective {self.objective} is not one of {', '.join(OBJECTIVES)}")
        self.preference()  # validates --beta and the weights
        # Options of one objective given to another would be silently ignored: say so instead.
        if self.objective == "sft" and self.preference() != Preference():
            raise UserError("--beta, --desirable-weight and --undesirable-weight apply to --objective kto or dpo; "
                            "add --objective or drop them")
        if self.objective != "sft" and self.labels != "good":
            raise UserError(f"--labels applies to --objective sft (--objective {self.objective} learns from good "
                            "and bad answers alike); drop it")

    def _check_full(self) -> None:
        """--full trains the weights themselves: the adapter's own options mean nothing there."""
        if self.quantize:
            raise UserError("--full trains every weight and a 4-bit base cannot be trained; leave out --quantize")
        if self.init_from is not None:
            raise UserError("--init-from continues an adapter; to continue a full fine-tune pass its directory "
                            "as --base")
        if self.objective != "sft":
            raise UserError(f"--objective {self.objective} compares with the base through disabled adapters; "
                            "--full has none: leave out --full or --objective")
        fields = TrainConfig.__dataclass_fields__
        for name in ("r", "alpha", "dropout", "targets", "dora", "trainable_tokens", "init", "lr_ratio",
                     "lr_embedding"):
            if getattr(self, name) != fields[name].default:
                raise UserError(f"--{name.replace('_', '-')} sets up an adapter and has no meaning with --full; "
                                "leave it out")

    def _check_fsdp(self) -> None:
        """--fsdp keeps the trainable parameters (an adapter's) out of FSDP and shards the frozen rest."""
        if self.full:
            raise UserError("--fsdp shards the frozen base around an adapter; --full trains every weight and is "
                            "not supported with it: leave out one of them")

    def preference(self) -> Preference:
        return Preference(self.beta, self.desirable_weight, self.undesirable_weight)

    def lora_config(self, token_ids: list[int] | None = None) -> LoraConfig:
        """The adapter's config; `token_ids`: --trainable-tokens as ids (tokens given by name need the tokenizer)."""
        # a list of module names; anything else ("all-linear", a regex over full names) stays a string
        init = True if self.init == "lora" else self.init
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, use_dora=self.dora,
                          init_lora_weights=init, trainable_token_indices=token_ids,
                          target_modules=parse_names(self.targets), base_model_name_or_path=base_name(self.base))


# Fields that must not change between a run and its --resume: everything that decides the numbers (the
# schedule's length included). The number of processes and the data file's contents (its sha256, not its
# path: the file may move) are compared too. What may change: where --data and --out are, --eval-data,
# --eval-every, --eval-batches, --checkpoint-every, --quiet (they change what is reported or how often it
# is saved, not the adapter).
RESUME_KEYS = ("base", "r", "alpha", "dropout", "targets", "dora", "trainable_tokens", "init", "lr", "lr_ratio",
               "lr_embedding", "warmup", "steps", "epochs", "batch_size", "grad_accum", "seq_len", "seed", "init_from",
               "dtype", "quantize", "activation_checkpointing", "compile", "labels", "weight_decay", "max_grad_norm",
               "objective", "beta", "desirable_weight", "undesirable_weight", "full")


def train(config: TrainConfig, should_stop: Callable[[int], bool] | None = None) -> dict:
    """Train an adapter as `config` says. Returns the training summary (also written to --out).

    `should_stop(step)` is asked after every optimizer step; True checkpoints and returns early
    (the CLI wires Ctrl-C to it). Under torchrun each process is one data-parallel rank.
    """
    world = distributed.setup()
    try:
        check_fsdp_world(config, world.size)
        return _train(config, should_stop, world)
    finally:
        distributed.teardown(world)


def check_fsdp_world(config: TrainConfig, processes: int) -> None:
    """--fsdp shards over processes: with one there is nothing to shard, and silently not sharding a base
    the user expected to split would only surface as running out of memory."""
    if config.fsdp and processes < 2:
        raise UserError(f"--fsdp shards the base across processes and this run has {processes}; add --nproc N "
                        "(N >= 2) or launch with torchrun, or leave out --fsdp")


def _train(config: TrainConfig, should_stop: Callable[[int], bool] | None, world: distributed.World) -> dict:
    """Setup, loop, save; every rank runs this, rank 0 alone writes files and prints."""
    say = _say if world.main and not config.quiet else _silent
    run = _setup(config, world)
    say(_describe(run, config, world))
    base_eval = run.base_eval
    history = _read_metrics(run.out / "metrics.jsonl", upto=run.state["step"]) if world.main else []

    stopped = False
    # a non-finite loss raises in _train_step: the last checkpoint stays
    with _progress(config, world, run) as bar, products.onednn_fp32(run.state["onednn_fp32"]):
        for step in range(run.state["step"], run.total_steps):
            record = _train_step(run, config, world, step)
            last = step + 1 == run.total_steps
            if world.main or config.fsdp:  # with --fsdp every rank takes part in each forward
                record.update(_evaluate_due(run, config, last))
            if world.main:
                _record(run, record, history)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                bar.update(1)
            stopped = _should_stop(world, should_stop, step + 1) and not last
            if ((step + 1) % config.checkpoint_every == 0 and not last) or stopped:
                _checkpoint(run, config, world)
            if stopped:
                break

    if not world.main:
        distributed.barrier(world)
        return {"rank": world.rank, "step": run.state["step"], "interrupted": stopped}
    plot_loss(history, run.out / "loss.png")
    if stopped:
        return _interrupted(run, config, world, say)
    return _save(run, config, world, history, base_eval, say)


@dataclass
class _Run:
    """What a training run holds between setup, loop and save."""

    out: Path
    device: torch.device
    dtype: torch.dtype
    model: nn.Module
    tokenizer: object
    memory: BaseMemory
    examples: list
    stats: object
    eval_examples: list | None
    seq_len: int
    params: list[nn.Parameter]
    objective: SFT | DPO | KTO  # the loss of a micro-batch, with its figures
    step_loss: nn.Module  # the objective, wrapped in DDP when there are several ranks (not with --fsdp)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    counts: object
    state: dict  # step, tokens, train_seconds, onednn_fp32: what a checkpoint restores
    settings: dict  # what a --resume must match (`_resume_view`)
    base_eval: float | None  # the base's held-out loss (rank 0, sft with --eval-data), to set the trained one's against
    shard_bytes: list[int] | None  # --fsdp: the base's bytes each rank holds after sharding, in rank order


# ---- setup ----------------------------------------------------------------------------------------


def _setup(config: TrainConfig, world: distributed.World) -> _Run:
    """Base, data, adapter, optimizer and schedule, the checkpoint's state on --resume; then the output
    directory. Everything that can be refused is, before --out is created or touched: a refusal leaves
    no file behind and an --overwrite'd run as it was."""
    out = config.out
    if world.main:
        _check_out(config)
    torch.manual_seed(config.seed)
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = resolve_dtype(config.dtype, device)
    onednn = _onednn_products(dtype, device, world)  # before anything loads: a bad LORAKIT_ONEDNN_FP32 is refused
    # QLoRA: the base streams in and each chosen Linear is quantized as it arrives (never whole at full precision).
    # A full fine-tune keeps fp32 master weights (autocast computes in `dtype`): AdamW's small updates
    # would round away in bf16 weights. An adapter's own weights are fp32 whatever the base's dtype.
    # --fsdp: the base loads into CPU memory (whole, in every process) and sharding moves each rank's
    # part to its device, so no device holds the whole base.
    model, tokenizer = load_base(config.base, dtype=torch.float32 if config.full else dtype,
                                 device=torch.device("cpu") if config.fsdp else device,
                                 quantize=quantize_spec(config.quantize))
    memory = base_memory(model)
    seq_len = _seq_len(config, model)
    examples, stats = _load_data(config, config.data, tokenizer, seq_len, config.labels)
    step_rows = config.batch_size * config.grad_accum * world.size
    if step_rows > len(examples):  # a step would repeat rows (and 10**7 of them would never finish)
        ranks = f" x {world.size} ranks" if world.active else ""
        raise UserError(f"one step of --batch-size {config.batch_size} x --grad-accum {config.grad_accum}{ranks} is "
                        f"{step_rows:,} rows, more than the {len(examples):,} rows {config.data} gives at --seq-len "
                        f"{seq_len}; lower them or add data")
    eval_examples = _load_data(config, config.eval_data, tokenizer, seq_len, "all")[0] if config.eval_data else None
    _add_adapter(config, model, tokenizer)
    # Before a checkpoint is restored: with --full that overwrites the base's own weights.
    base_eval = _base_eval(model, tokenizer, eval_examples, config) if eval_examples and world.main else None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    objective = _objective(config, model, world)
    counts = trainable_parameters(model)  # before sharding: NF4 codes are buffers, each tensor whole
    shard_bytes = None
    if config.fsdp:  # after the adapter exists (its parameters stay whole) and rank 0's look at the plain base
        step_loss = distributed.shard(model, objective, device)
        shard_bytes = distributed.gather(world, distributed.local_bytes(model))
    else:
        step_loss = _step_loss(objective, world, device)
    if config.lr_ratio is not None:  # LoRA+: B faster than A, in PEFT's groups
        groups = loraplus_groups(model, config.lr, config.lr_ratio, config.weight_decay, config.lr_embedding)
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    global_rows = config.batch_size * config.grad_accum * world.size
    total_steps = config.steps or max(1, math.ceil(config.epochs * len(examples) / global_rows))
    warmup = int(config.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total_steps))
    # fp32 products through oneDNN or torch's BLAS: chosen on a fresh run, as recorded on a resumed one (the
    # two round differently, and a resumed run must give the adapter the uninterrupted one would); a
    # checkpoint that records nothing was written before lorakit routed any product: torch's BLAS
    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "onednn_fp32": onednn}
    settings = _resume_view(config, world)
    if config.resume:
        state = {"onednn_fp32": False,
                 **load_checkpoint(out / "checkpoint", model, optimizer, scheduler, settings, rank=world.rank)}
    if world.main:
        _prepare_out(config)
    distributed.barrier(world)
    return _Run(out, device, dtype, model, tokenizer, memory, examples, stats, eval_examples, seq_len, params,
                objective, step_loss, optimizer, scheduler, total_steps, counts,
                state, settings, base_eval, shard_bytes)


def _onednn_products(dtype: torch.dtype, device: torch.device, world: distributed.World) -> bool:
    """Whether this run's fp32 products go through oneDNN (`lorakit.products.choose`, which reads and checks
    LORAKIT_ONEDNN_FP32 whatever the precision); only where every rank would, so that all ranks multiply alike."""
    chosen = products.choose() and device.type == "cpu" and dtype == torch.float32
    return distributed.all_sum(world, int(chosen)) == world.size


def _seq_len(config: TrainConfig, model: nn.Module) -> int:
    max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if config.seq_len is not None and config.seq_len > max_len:
        raise UserError(f"--seq-len {config.seq_len} is over this model's maximum of {max_len}; lower it")
    return config.seq_len or min(256, max_len)


def _load_data(config: TrainConfig, path: Path, tokenizer, seq_len: int, labels: str) -> tuple[list, object]:
    """Training rows for sft; judged records (kto) or pairs (dpo) for the preference objectives."""
    if config.objective == "sft":
        return load_examples(path, tokenizer, seq_len, labels)
    return load_preferences(path, tokenizer, seq_len, config.objective)


def _add_adapter(config: TrainConfig, model: nn.Module, tokenizer) -> None:
    """A new adapter (or --init-from's, trainable), then the memory and speed options that act on it.

    A preference run that continues an adapter compares with that adapter as it started (TRL's
    behaviour from an SFT model): a frozen copy of it is loaded first, as the reference. With --full
    there is no adapter: the base's own weights train."""
    if config.full:
        model.requires_grad_(True)
    elif config.init_from is not None:
        if config.objective != "sft":
            add_reference(model, config.init_from)
        load_adapter(model, config.init_from, adapter="default", trainable=True)
    else:
        inject(model, _lora_config(config, model, tokenizer))
    if config.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError("this base does not support activation checkpointing (asked for, or on by default with "
                            "--quantize); pass --no-activation-checkpointing")
        enable_activation_checkpointing(model)
    if config.compile:
        # In place (nn.Module.compile): module names, and so the saved adapter's keys, stay the same.
        (model.get_decoder() if hasattr(model, "get_decoder") else model).compile()


def _lora_config(config: TrainConfig, model: nn.Module, tokenizer) -> LoraConfig:
    """The adapter's config. PiSSA and OLoRA rewrite the base weights they adapt, and an output head tied
    to the input embedding cannot be rewritten alone; trainable token rows of the embedding are the tied
    head's rows too, which take no LoRA beside them. With the default targets both leave such a head out
    (every linear layer, as --targets all-linear); named explicitly, it is refused by name."""
    tokens = token_ids(token_items(config.trainable_tokens), tokenizer) if config.trainable_tokens else None
    lora = config.lora_config(tokens)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if tokens and embedding is not None:  # the ids as the user gave them (inject checks them again, by layer)
        check_ids(tokens, embedding.num_embeddings, "--trainable-tokens",
                  f"this base's vocabulary of {embedding.num_embeddings} tokens")
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    if config.targets == DEFAULT_TARGETS and tied and (config.init.startswith(("pissa", "olora")) or tokens):
        lora = replace(lora, target_modules=ALL_LINEAR)
    return lora


def token_items(text: str | None) -> list[int | str]:
    """--trainable-tokens as given: ids (digits) and tokens by name, in order; refuses empty items and ids no
    vocabulary has."""
    if text is None:
        return []
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise UserError(f"--trainable-tokens {text!r} has an empty item; give comma-separated token ids or tokens")
    parsed = [int(t) if t.isdigit() and t.isascii() else t for t in items]
    big = next((t for t in parsed if isinstance(t, int) and t >= 1 << 31), None)
    if big is not None:
        raise UserError(f"--trainable-tokens: token id {big} is beyond any vocabulary; give ids of the base's tokenizer")
    return parsed


def token_ids(items: list[int | str], tokenizer) -> list[int]:
    """Each item as a token id: an id as given; a name as the tokenizer's token of that name, else the one token
    its text encodes to. (LoraConfig refuses repeats: which of two values a row takes would be a guess.)"""
    vocabulary = tokenizer.get_vocab()
    ids = []
    for item in items:
        if isinstance(item, int):
            ids.append(item)
        elif item in vocabulary:
            ids.append(vocabulary[item])
        else:
            encoded = tokenizer.encode(item, add_special_tokens=False)
            if len(encoded) != 1:
                raise UserError(f"--trainable-tokens: {item!r} is {len(encoded)} tokens of this tokenizer, not one; "
                                "give single tokens or their ids")
            ids.append(encoded[0])
    return ids


def _objective(config: TrainConfig, model: nn.Module, world: distributed.World) -> SFT | DPO | KTO:
    reference = REFERENCE_ADAPTER if config.init_from is not None and config.objective != "sft" else None
    if config.objective == "dpo":
        return DPO(model, config.preference(), reference)
    if config.objective == "kto":
        if config.batch_size * world.size < 2:
            raise UserError("--objective kto estimates its KL term from the other answers of a batch; "
                            "use --batch-size 2 or more")
        return KTO(model, config.preference(), world, reference)
    return SFT(model)


def _step_loss(step_loss: nn.Module, world: distributed.World, device: torch.device) -> nn.Module:
    """The objective; under several ranks wrapped in DDP, which all-reduces the adapter gradients
    (the frozen base has none) and syncs the init."""
    if not world.active:
        return step_loss
    with warnings.catch_warnings():  # newer torch renames the flag; its meaning here is unchanged
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(
            step_loss, device_ids=[world.local_rank] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the frozen base (NF4 codes are buffers) is the same on every rank


def _describe(run: _Run, config: TrainConfig, world: distributed.World) -> str:
    """Two lines on what is about to run: base, precision, data; parameters and steps."""
    ranks = f" x {world.size} ranks" if world.active else ""
    if run.shard_bytes is not None:
        held = max(run.shard_bytes)
        ranks += (f"; FSDP: each rank holds {held / 1e6:,.2f} MB ({100 * held / run.memory.bytes:.0f}%) of the "
                  f"base's {run.memory.bytes / 1e6:,.2f} MB")
    nf4_note = f", NF4 at {run.memory.nf4_bits_per_param:.3f} bits/param" if run.memory.nf4_params else ""
    objective = "" if config.objective == "sft" else f"{config.objective} (beta {config.beta}) on "
    # fp32 weights, gradients and AdamW's two moments; an adapter's few parameters need the same each
    full_note = (f"\nfull fine-tune: weights, gradients and AdamW moments take {16 * run.counts.trainable / 1e6:,.0f} MB "
                 "(16 bytes per parameter)" if config.full else "")
    onednn = ", fp32 products through oneDNN" if run.state["onednn_fp32"] else ""
    return (f"base {base_name(config.base)} ({dtype_name(run.dtype)} on {run.device.type}{nf4_note}{onednn}); "
            f"{objective}data: {run.stats.summary()}\n"
            f"{run.counts}; {run.total_steps} steps of {config.batch_size}x{config.grad_accum} rows{ranks}{full_note}")


def _base_eval(model: nn.Module, tokenizer, eval_examples: list, config: TrainConfig) -> float | None:
    """The base's held-out loss, to set the adapter's against (sft; the preference objectives start from
    their reference: margin 0, accuracy 0.5)."""
    if config.objective != "sft":
        return None
    with _original_base(model):  # with --full there are no adapters: the model is still the base
        return mean_nll(model, eval_examples, tokenizer.pad_token_id, config.batch_size, config.eval_batches)[0]


@contextlib.contextmanager
def _original_base(model: nn.Module):
    """The model as its original base: adapters disabled; after PiSSA / OLoRA, whose base weights hold the
    residual W - s·B₀·A₀, the adapter at its initial A₀, B₀ instead (W to float rounding)."""
    layers = [layer for _, layer in lora_layers(model) if layer.initial]
    if not layers:
        with disable_adapters(model):
            yield
        return
    trained = {layer: (layer.lora_A["default"].detach().clone(), layer.lora_B["default"].detach().clone())
               for layer in layers}
    try:
        with torch.no_grad():
            for layer in layers:
                layer.lora_A["default"].copy_(layer.initial["default"][0])
                layer.lora_B["default"].copy_(layer.initial["default"][1])
        yield
    finally:
        with torch.no_grad():
            for layer, (A, B) in trained.items():
                layer.lora_A["default"].copy_(A)
                layer.lora_B["default"].copy_(B)


# ---- loop -----------------------------------------------------------------------------------------


def _progress(config: TrainConfig, world: distributed.World, run: _Run):
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=run.state["step"], disable=config.quiet or not world.main,
                unit="step", dynamic_ncols=True)


def _train_step(run: _Run, config: TrainConfig, world: distributed.World, step: int) -> dict:
    """One optimizer step over `grad_accum` micro-batches; updates `run.state`, returns the step's record."""
    t0 = time.perf_counter()
    # This rank's slice of each global micro-batch: rank r takes rows [r*b, (r+1)*b).
    pad_id = run.tokenizer.pad_token_id
    batches = [run.objective.collate(batch_at(run.examples, step * config.grad_accum + micro,
                                              config.batch_size * world.size, config.seed),
                                     world.rank, config.batch_size, pad_id, run.seq_len)
               for micro in range(config.grad_accum)]
    # Weight every unit of the whole step (learned token for sft, pair or record otherwise; all
    # micro-batches, all ranks) equally, so N ranks with batch b train exactly like one process with batch N*b.
    learned = [run.objective.units(b) for b in batches]
    step_tokens = distributed.all_sum(world, sum(learned))
    loss_sum, tokens = 0.0, 0
    for micro, batch in enumerate(batches):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        sync = micro == len(batches) - 1 or not world.active or config.fsdp  # --fsdp: averaged below
        with autocast(run.device, run.dtype), (nullcontext() if sync else run.step_loss.no_sync()):
            # x world.size: DDP (or average_gradients) divides the summed gradient by the ranks
            loss = run.step_loss(batch, learned[micro] * world.size / max(step_tokens, 1))
        loss.backward()
        loss_sum += loss.item() / world.size
        tokens += int(batch["attention_mask"].sum())
    if config.fsdp:  # the adapter is outside FSDP's units: average its gradients as DDP does
        distributed.average_gradients(world, run.params)
    norm = _grad_norm(run.params, config.max_grad_norm)  # clipped to --max-grad-norm when it is > 0
    loss_sum = distributed.all_sum(world, loss_sum)  # the step's mean loss over every learned token
    if not (math.isfinite(loss_sum) and math.isfinite(norm)):  # the same values on every rank: all stop here
        run.optimizer.zero_grad(set_to_none=True)
        raise UserError(_non_finite(run, config, step, loss_sum, norm))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    tokens = distributed.all_sum(world, tokens)
    state = run.state
    run.state = {**state, "step": step + 1, "tokens": state["tokens"] + tokens,
                 "train_seconds": state["train_seconds"] + seconds}
    return {"step": step + 1, "loss": loss_sum, "lr": run.scheduler.get_last_lr()[0], "tokens": run.state["tokens"],
            "tokens_per_s": tokens / seconds, **run.objective.figures(world)}


def _grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The adapter gradient's total norm, clipping it to `max_norm` first when that is > 0."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _non_finite(run: _Run, config: TrainConfig, step: int, loss: float, norm: float) -> str:
    """What to tell the user when a step's loss or gradient is NaN or Inf (nothing of that step is applied)."""
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
    checkpoint = run.out / "checkpoint"
    kept = (f"the last good checkpoint is kept in {checkpoint}" if has_checkpoint(checkpoint)
            else "no checkpoint had been written yet")
    return (f"step {step + 1}: {what}, so training stopped before that step changed the adapter (no adapter was "
            f"saved; {kept}). Lower --lr (now {config.lr:g}), use --dtype fp32 or a --max-grad-norm, or check the "
            "data")


def _evaluate_due(run: _Run, config: TrainConfig, last: bool) -> dict:
    """The held-out figures every --eval-every steps and at the end ({} in between or without --eval-data)."""
    if not run.eval_examples or not (run.state["step"] % config.eval_every == 0 or last):
        return {}
    run.model.eval()
    with distributed.unsharded(run.step_loss) if config.fsdp else nullcontext():
        figures = _evaluate(run, config)
    run.model.train()
    return figures


def _record(run: _Run, record: dict, history: list[dict]) -> None:
    """Append the step's record to the history and metrics.jsonl."""
    history.append(record)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _evaluate(run: _Run, config: TrainConfig) -> dict:
    """Held-out figures: loss and perplexity (sft), preference accuracy and margin (dpo), rewards (kto)."""
    pad_id = run.tokenizer.pad_token_id
    if config.objective == "sft":
        loss = mean_nll(run.model, run.eval_examples, pad_id, config.batch_size, config.eval_batches)[0]
        return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}
    examples = run.eval_examples[:config.batch_size * config.eval_batches]
    with autocast(run.device, run.dtype):
        return run.objective.evaluate(examples, config.batch_size, pad_id, run.seq_len)


def _should_stop(world: distributed.World, should_stop: Callable[[int], bool] | None, step: int) -> bool:
    """The caller's stop request (Ctrl-C), agreed by every rank so that all stop at the same step."""
    stop = should_stop is not None and should_stop(step)
    return distributed.all_sum(world, int(stop)) > 0


def _checkpoint(run: _Run, config: TrainConfig, world: distributed.World) -> None:
    rng_states = distributed.gather(world, rng_state())  # every rank's own generators (dropout differs per rank)
    if world.main:
        save_checkpoint(run.out / "checkpoint", run.model, run.optimizer, run.scheduler, run.state, run.settings,
                        rng_states)
    distributed.barrier(world)


# ---- save -----------------------------------------------------------------------------------------


def _interrupted(run: _Run, config: TrainConfig, world: distributed.World, say: Callable[[str], None]) -> dict:
    distributed.barrier(world)
    say(f"interrupted at step {run.state['step']}/{run.total_steps}; checkpoint saved. Resume with:\n"
        f"  lorakit train {shlex.join(a for a in cli_args(config) if a != '--overwrite')} --resume")
    return {"interrupted": True, "step": run.state["step"], "total_steps": run.total_steps}


def _save(run: _Run, config: TrainConfig, world: distributed.World, history: list[dict], base_eval: float | None,
          say: Callable[[str], None]) -> dict:
    """The adapter (or with --full the model) and the run's summary into --out; the checkpoint goes."""
    run.model.eval()
    if config.full:
        save_model(run.model, config.base, run.out)
    else:
        save_adapter(run.model, run.out)
    summary = _summary(config, run.counts, run.stats, run.state, history, base_eval, run.total_steps, run.memory)
    summary["world_size"] = world.size
    summary["fsdp"] = config.fsdp
    if run.shard_bytes is not None:  # what each rank holds of the base once sharded (the whole: memory.base_bytes)
        summary["memory"]["base_bytes_per_rank"] = run.shard_bytes
    summary["objective"] = config.objective
    summary["figures"] = _final_figures(history)
    atomic_write_bytes(run.out / "training_summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    _remove_checkpoints(run.out)
    distributed.barrier(world)
    say(f"{'model' if config.full else 'adapter'} saved to {run.out} ({summary['weights_bytes'] / 1e6:.2f} MB); "
        f"{summary['tokens_per_s']:,.0f} tokens/s; final train loss {summary['final_train_loss']:.3f}"
        + (f"; eval perplexity {summary['eval_perplexity_base']:.2f} -> {summary['eval_perplexity_adapted']:.2f}"
           if base_eval is not None else "")
        + (f"\n{config.objective}: {_figures_line(summary['figures'], config.objective)}" if summary["figures"] else ""))
    return summary


def save_model(model: nn.Module, base: str | None, out: Path) -> None:
    """A full fine-tune's result: a transformers model directory in `out` (config, safetensors weights and
    the base's own tokenizer files), which `AutoModelForCausalLM.from_pretrained(out)` loads. Written
    beside, then moved in file by file: `out` also holds the run's metrics, and a crash leaves whole files."""
    from transformers.utils import logging as hf_logging

    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError("the trained weights are not finite; no model written (lower --lr)")
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".model.", suffix=".tmp"))
    hf_logging.disable_progress_bar()  # a bar for writing one shard is noise
    try:
        model.save_pretrained(staging)
        fresh_tokenizer(base).save_pretrained(staging)  # load_base may have set a pad token; ship the base's files
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        hf_logging.enable_progress_bar()
        shutil.rmtree(staging, ignore_errors=True)


# ---- pieces ---------------------------------------------------------------------------------------


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# What a run writes into --out: removed by --overwrite (and nothing else there), so no file of an earlier
# run ends up beside the new one's.
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "training_summary.json",
             # with --full, a model directory
             "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _check_out(config: TrainConfig) -> None:
    """Refuse an --out that cannot take this run, before any work; creates and changes nothing."""
    out = config.out
    check_output(out, "--out", directory=True)
    if config.resume:
        if not has_checkpoint(out / "checkpoint"):
            done = " (the run there finished: its result is saved)" if (out / "training_summary.json").exists() else ""
            raise UserError(f"nothing to resume in {out}: no checkpoint/ there{done}; it is removed when a run "
                            "finishes")
        return
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it or --resume to continue it")


def _prepare_out(config: TrainConfig) -> Path:
    """Create --out, or clear an earlier run's files from it (--overwrite); sweep a crashed save's leftovers."""
    out = config.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to --out {out} ({err.strerror}); choose a writable directory") from None
    if not config.resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for shard in out.glob("model-*-of-*.safetensors"):  # a sharded --full model
            shard.unlink()
        _remove_checkpoints(out)
    # What a killed process leaves: a checkpoint being staged or removed, a run file's temporary copy.
    # (`.checkpoint.old`, a checkpoint mid-swap, stays: it may be what this run resumed from.)
    for leftover in [*out.glob(".checkpoint.*.tmp"), out / ".checkpoint.removing",
                     *(p for name in RUN_FILES for p in out.glob(f".{name}.*.tmp")), *out.glob(".model.*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return out


def _remove_checkpoints(out: Path) -> None:
    """Remove the checkpoint (and its mid-swap copy): renamed away first, so no half-removed one can be resumed."""
    for directory in (out / "checkpoint", previous_directory(out / "checkpoint")):
        if directory.exists():
            doomed = directory.with_name(f".{directory.name}.removing")
            shutil.rmtree(doomed, ignore_errors=True)
            directory.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _resume_view(config: TrainConfig, world: distributed.World) -> dict:
    """The settings a --resume must match: RESUME_KEYS, the number of processes, the data's sha256."""
    view = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k in RESUME_KEYS}
    view["world_size"] = world.size
    view["data_sha256"] = _sha256(config.data)
    return view


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path, "data file") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_metrics(path: Path, upto: int) -> list[dict]:
    """Metrics of steps up to `upto` (a resumed run drops what came after its checkpoint).

    A last line cut short (the process was killed while writing it) is dropped; any other line that
    is not a step's record is an error naming it.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if number == len(lines):
                break  # torn by a crash
            raise UserError(f"{path}:{number} is not a metrics record; fix or remove that line to resume")
        rows.append(row)
    rows = [r for r in rows if r["step"] <= upto]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return rows


def _summary(config, counts, stats, state, history, base_eval, total_steps, memory: BaseMemory) -> dict:
    last = history[-min(len(history), 10):]
    evals = [r for r in history if "eval_loss" in r]
    adapter_bytes = sum(f.stat().st_size for f in config.out.glob("adapter_*"))
    return {
        "base": base_name(config.base),
        "full": config.full,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_percent": counts.percent,
        "steps": total_steps,
        "tokens_seen": state["tokens"],
        "tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
        "train_seconds": state["train_seconds"],
        "final_train_loss": sum(r["loss"] for r in last) / max(1, len(last)),
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_perplexity_base": perplexity(base_eval) if base_eval is not None else None,
        "eval_perplexity_adapted": evals[-1]["eval_perplexity"] if evals else None,
        "adapter_bytes": None if config.full else adapter_bytes,
        "weights_bytes": sum(f.stat().st_size for f in config.out.glob("*.safetensors")),  # adapter or model
        "memory": {
            "base_bytes": memory.bytes,
            "base_bits_per_param": memory.bits_per_param,  # all base weights, NF4 or not
            "nf4_params": memory.nf4_params,
            "nf4_bits_per_param": memory.nf4_bits_per_param,  # codes + constants; 4.127 with double quant
            "peak_bytes": _peak_memory_bytes(),
        },
        "data": asdict(stats),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    }


def _final_figures(history: list[dict]) -> dict[str, float]:
    """The objective's own figures at the end: training ones averaged over the last 10 steps, held-out
    ones as last measured."""
    last = history[-min(len(history), 10):]
    names = [k for k in (last[-1] if last else {}) if k.startswith("rewards/") or k == "kl"]
    figures = {k: sum(r[k] for r in last if k in r) / max(1, sum(k in r for r in last)) for k in names}
    evals = [r for r in history if any(k.startswith("eval_") and k not in ("eval_loss", "eval_perplexity") for k in r)]
    if evals:
        figures.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
    return figures


def _figures_line(figures: dict[str, float], objective: str) -> str:
    """One line of the objective's figures: rewards of chosen/good and rejected/bad, margin, accuracy, KL."""
    names = {"rewards/chosen": "reward good" if objective == "kto" else "reward chosen",
             "rewards/rejected": "reward bad" if objective == "kto" else "reward rejected",
             "rewards/margins": "margin", "rewards/accuracies": "accuracy", "kl": "KL",
             "eval_accuracy": "held-out accuracy", "eval_margin": "held-out margin",
             "eval_rewards_good": "held-out reward good", "eval_rewards_bad": "held-out reward bad"}
    return ", ".join(f"{label} {figures[k]:+.3f}" for k, label in names.items() if k in figures)


def _peak_memory_bytes() -> int:
    """Peak memory of this process so far: the GPU's peak allocation on CUDA, else the peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _say(text: str) -> None:
    print(text, flush=True)


def _silent(text: str) -> None:
    pass


def cli_args(config: TrainConfig) -> list[str]:
    """The command-line arguments that reproduce `config` (--data, --out and what differs from defaults)."""
    defaults = TrainConfig.__dataclass_fields__
    args: list[str] = []
    for key, value in asdict(config).items():
        flag = f"--{key.replace('_', '-')}"
        if key not in ("data", "out") and value == defaults[key].default:
            continue
        if isinstance(value, bool):  # a switch: --name, or --no-name where the default is on or undecided
            args.append(flag if value else f"--no-{flag.removeprefix('--')}")
        else:
            args += [flag, str(value)]
    return args


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward (a transformers model), non-reentrant: works with a
    frozen embedding (no input that requires grad) and with DDP."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ---- CLI ------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "train", help="train an adapter on a frozen base",
        description="Train one LoRA adapter on a frozen base model; saves it in PEFT's format.\n\nexamples:\n"
                    "  lorakit train --data my_domain.txt --out adapters/mine\n"
                    "  lorakit train --base ~/models/llama --data chats.jsonl --r 16 --targets all-linear --out adapters/x\n"
                    "  lorakit train --base ~/models/big --quantize nf4 --data d.jsonl --out adapters/q   # QLoRA\n"
                    "  lorakit train --nproc 2 --fsdp --base ~/models/big --data d.jsonl --out adapters/x   # base sharded",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainConfig)

    p.add_argument("--nproc", type=int, default=None,
                   help="train with N data-parallel processes on this machine (starts torchrun for you)")

    def run(args) -> int:
        config = TrainConfig(**options(args, TrainConfig))
        if args.nproc is not None and "WORLD_SIZE" not in os.environ:
            check_fsdp_world(config, args.nproc)  # before torchrun starts processes that would each refuse
            return distributed.launch(args.nproc, ["train", *cli_args(config)])
        if config.quantize is None:  # a 4-bit base returns freed memory instead (the loader sets it)
            heap.keep_freed_memory()  # this process only trains: a step's big blocks serve the next one's
        with ctrl_c_stops() as should_stop:
            result = train(config, should_stop=should_stop)
        return 130 if result.get("interrupted") else 0

    p.set_defaults(func=run)


@contextlib.contextmanager
def ctrl_c_stops() -> Iterator[Callable[[int], bool]]:
    """In the block, a first Ctrl-C makes the yielded `should_stop` say True (the step finishes and a
    checkpoint is written); a second one stops at once."""
    import signal

    interrupted = []

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda step: bool(interrupted)
    finally:
        signal.signal(signal.SIGINT, previous)
