"""Benchmarks 1-4: a LoRA training step on a ~25M Llama-shaped model, lorakit vs PEFT, same run.

r=16 on every linear layer but the head, batch 8x256 (packed, no padding), AdamW. Each step is
forward (+ loss), backward, optimizer step, zero_grad.
- lorakit: its default path, `causal_lm_loss` (chunked cross-entropy) and the gated MLP blocks that
  `inject` sets up (`lorakit.mlp`: act(gate)·up recomputed in the backward); in bf16 the frozen base
  is stored in bf16 (as `lorakit train --dtype bf16` loads it) and runs under bf16 autocast.
- PEFT: `get_peft_model` on the fp32 model, `model(**batch).loss`; in bf16, bf16 autocast (the usual
  Trainer setting).
The base's no-grad forward in the same precision is timed in the same interleaved rounds (benchmark 3).
bf16 runs on the small shape unless told otherwise: on a CPU without AVX-512 BF16 / AMX, a bf16
matmul is ~30x slower than fp32, and a full-size bf16 step would take minutes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import lorakit
from benchmarks.common import LLAMA_25M, LLAMA_SMALL, interleaved, llama, ms, token_batch
from lorakit.base import resolve_dtype
from lorakit.losses import causal_lm_loss
from lorakit.train import enable_activation_checkpointing

R = 16


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def lorakit_model(base, precision: str, checkpointing: bool = False, dropout: float = 0.0, dora: bool = False):
    model = copy.deepcopy(base)
    if checkpointing:  # recompute each decoder layer in the backward: memory for ~1 more forward of time
        enable_activation_checkpointing(model)  # as `lorakit train --activation-checkpointing`
    if precision == "bf16":
        model.to(torch.bfloat16)  # frozen base in bf16; adapters stay fp32 masters
    lorakit.inject(model, lorakit.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", lora_dropout=dropout,
                                             use_dora=dora))
    return model.train()


def peft_model(base, dropout: float = 0.0, dora: bool = False):
    import peft

    config = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", lora_dropout=dropout, use_dora=dora)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    return model.train()


def lorakit_loss(model, batch):
    return causal_lm_loss(model, batch)


def peft_loss(model, batch):
    return model(**batch).loss


def make_step(model, batch, precision: str, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with _autocast(precision):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def make_forward(base, batch, precision: str):
    def forward():
        with torch.no_grad(), _autocast(precision):
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return forward


def time_steps(precision: str, shape: dict, batch_size: int, seq: int, rounds: int, repeats: int,
               checkpointing: bool = False) -> dict:
    """Interleaved medians of: the base's no-grad forward, a lorakit step, a PEFT step (and lorakit with
    activation checkpointing)."""
    base = llama(shape)
    batch = token_batch(shape["vocab_size"], batch_size, seq)
    ours, theirs = lorakit_model(base, precision), peft_model(base)
    counts = (lorakit.trainable_parameters(ours).trainable,
              sum(p.numel() for p in theirs.parameters() if p.requires_grad))
    assert counts[0] == counts[1], f"lorakit and PEFT train different parameter counts: {counts}"
    plain = copy.deepcopy(base).to(torch.bfloat16) if precision == "bf16" else base
    fns = {"forward": make_forward(plain, batch, precision),
           "lorakit": make_step(ours, batch, precision, lorakit_loss),
           "peft": make_step(theirs, batch, precision, peft_loss)}
    if checkpointing:
        fns["lorakit+ckpt"] = make_step(lorakit_model(base, precision, True), batch, precision, lorakit_loss)
    t = interleaved(fns, rounds=rounds, repeats=repeats, warmup=2)
    return {"precision": precision, "shape": shape, "batch": [batch_size, seq], "trainable": counts[0], **t}


def peak_memory(which: str, precision: str, shape: dict, batch_size: int, seq: int, checkpointing: bool = False,
                dropout: float = 0.0, dora: bool = False) -> float:
    """Peak RSS above the resident model during one training step, in MB, measured in a fresh process.

    glibc is told to mmap every large block, so freed tensors leave the RSS at once and the
    high-water mark (reset just before the step) tracks the live tensors of the step itself.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    args = json.dumps({"which": which, "precision": precision, "shape": shape, "batch": batch_size, "seq": seq,
                       "dropout": dropout, "dora": dora,
                       "checkpointing": checkpointing, "threads": torch.get_num_threads()})
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_step", args], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _measure_peak(spec: dict) -> None:
    """Child process of `peak_memory`: one warm-up step (optimizer state exists), then the measured step."""
    torch.set_num_threads(spec["threads"])
    base = llama(spec["shape"])
    batch = token_batch(spec["shape"]["vocab_size"], spec["batch"], spec["seq"])
    if spec["which"] == "lorakit":
        model = lorakit_model(base, spec["precision"], spec["checkpointing"], spec["dropout"], spec.get("dora", False))
        step = make_step(model, batch, spec["precision"], lorakit_loss)
    else:
        step = make_step(peft_model(base, spec["dropout"], spec.get("dora", False)), batch, spec["precision"], peft_loss)
    del base
    step()

    def status(key: str) -> float:
        line = next(line for line in open("/proc/self/status") if line.startswith(key))
        return int(line.split()[1]) / 1024  # kB -> MB

    resident = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    step()
    print(json.dumps({"peak_mb": status("VmHWM") - resident, "resident_mb": resident}))


def run(rounds: int = 3, repeats: int = 2, quick: bool = False) -> list[dict]:
    """Benchmarks 1-3: step times (fp32 at full size; bf16 on the small shape, see the module doc)."""
    full, seq, batch_size = (LLAMA_SMALL, 64, 2) if quick else (LLAMA_25M, 256, 8)
    small = LLAMA_SMALL
    bf16_batch, bf16_seq = (2, 64) if quick else (2, 128)
    fp32 = time_steps("fp32", full, batch_size, seq, rounds, repeats, checkpointing=True)
    bf16 = time_steps("bf16", small, bf16_batch, bf16_seq, rounds, max(1, repeats // 2))
    default = bf16 if resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16 else fp32
    rows = []

    def where(m):
        return (f"{'25M' if m['shape'] is LLAMA_25M else 'small'} model, batch {m['batch'][0]}x{m['batch'][1]}, "
                f"{m['trainable']:,} trainable")

    def speed_row(id_, label, m, ours, target):
        speed = m["peft"]["median"] / m[ours]["median"]
        return {"id": id_, "benchmark": label, "lorakit": m[ours], "peft": m["peft"], "value": speed,
                "unit": "x faster", "target": f">= {target}x faster", "met": speed >= target, "setup": where(m)}

    rows.append(speed_row(1, f"train step, defaults (lorakit auto -> {default['precision']}, PEFT fp32)",
                          default, "lorakit", 3))
    rows.append(speed_row(2, "train step, both fp32", fp32, "lorakit", 1.2))
    rows.append(speed_row(2, "train step, both bf16 autocast", bf16, "lorakit", 1.2))
    rows.append(speed_row(2, "train step, fp32, lorakit with activation checkpointing", fp32, "lorakit+ckpt", 1.2))
    for m in (fp32, bf16):
        ratio = m["lorakit"]["median"] / m["forward"]["median"]
        rows.append({"id": 3, "benchmark": f"train step / base no-grad forward, {m['precision']}",
                     "lorakit": m["lorakit"], "forward": m["forward"], "value": ratio, "unit": "x forward",
                     "peft_value": m["peft"]["median"] / m["forward"]["median"],
                     "target": "<= 2.3x", "met": ratio <= 2.3, "setup": where(m) + f"; forward {ms(m['forward'])}"})
    return rows


def _compiled(model):
    """The model with its decoder compiled in place (`lorakit train --compile` does the same)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    inner.get_decoder().compile()
    return model


def run_compiled(rounds: int = 3, repeats: int = 1, quick: bool = False) -> list[dict]:
    """torch.compile (optional in `lorakit train`): lorakit and PEFT each compiled, beside both eager, fp32."""
    shape, seq, batch_size = (LLAMA_SMALL, 64, 2) if quick else (LLAMA_25M, 256, 8)
    # Three models compiled in one process share the decoder's code object: without this, the second
    # and third recompiles turn on dynamic shapes (slower kernels) where a user's single model would not.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    base = llama(shape)
    batch = token_batch(shape["vocab_size"], batch_size, seq)
    plain = copy.deepcopy(base)
    fns = {"forward": make_forward(_compiled(plain), batch, "fp32"),
           "lorakit": make_step(_compiled(lorakit_model(base, "fp32")), batch, "fp32", lorakit_loss),
           "peft": make_step(_compiled(peft_model(base)), batch, "fp32", peft_loss),
           "peft eager": make_step(peft_model(base), batch, "fp32", peft_loss)}
    t = interleaved(fns, rounds=rounds, repeats=repeats, warmup=2)  # the first warm-up call compiles
    where = f"{'25M' if shape is LLAMA_25M else 'small'} model, batch {batch_size}x{seq}, fp32, decoder compiled"
    both = t["peft"]["median"] / t["lorakit"]["median"]
    vs_eager = t["peft eager"]["median"] / t["lorakit"]["median"]
    ratio = t["lorakit"]["median"] / t["forward"]["median"]
    return [
        {"id": 2, "benchmark": "train step, both fp32 + torch.compile", "lorakit": t["lorakit"], "peft": t["peft"],
         "value": both, "unit": "x faster", "target": ">= 1.2x faster", "met": both >= 1.2, "setup": where},
        {"id": 1, "benchmark": "train step, lorakit --compile vs PEFT default (eager fp32)", "lorakit": t["lorakit"],
         "peft": t["peft eager"], "value": vs_eager, "unit": "x faster", "target": ">= 3x faster",
         "met": vs_eager >= 3, "setup": where},
        {"id": 3, "benchmark": "train step / base no-grad forward, fp32, both compiled", "lorakit": t["lorakit"],
         "forward": t["forward"], "value": ratio, "unit": "x forward",
         "peft_value": t["peft"]["median"] / t["forward"]["median"], "target": "<= 2.3x", "met": ratio <= 2.3,
         "setup": where + f"; forward {ms(t['forward'])}"},
    ]


def run_memory(quick: bool = False) -> list[dict]:
    """Benchmark 4: peak memory of a step, each configuration in its own fresh process."""
    full, seq, batch_size = (LLAMA_SMALL, 64, 2) if quick else (LLAMA_25M, 256, 8)
    bf16_batch, bf16_seq = (2, 64) if quick else (2, 128)
    rows, peft_mb = [], {}
    # (precision, shape, batch, seq, lorakit with activation checkpointing, lora_dropout for both)
    runs = [("fp32", full, batch_size, seq, False, 0.0), ("bf16", LLAMA_SMALL, bf16_batch, bf16_seq, False, 0.0),
            ("fp32", full, batch_size, seq, True, 0.0), ("fp32", full, batch_size, seq, False, 0.05)]
    for precision, shape, b, s, ckpt, dropout in runs:
        ours = peak_memory("lorakit", precision, shape, b, s, checkpointing=ckpt, dropout=dropout)
        if (precision, b, dropout) not in peft_mb:
            peft_mb[precision, b, dropout] = peak_memory("peft", precision, shape, b, s, dropout=dropout)
        theirs = peft_mb[precision, b, dropout]
        rows.append({"id": 4, "benchmark": f"peak step memory above the model, {precision}"
                     + (", lorakit with activation checkpointing" if ckpt else "")
                     + (f", both with lora_dropout {dropout}" if dropout else ""),
                     "lorakit_mb": ours, "peft_mb": theirs, "value": ours / theirs, "unit": "x PEFT",
                     "target": "<= 0.6x PEFT", "met": ours / theirs <= 0.6,
                     "setup": f"{'25M' if shape is LLAMA_25M else 'small'} model, batch {b}x{s}"})
    return rows


if __name__ == "__main__":
    _measure_peak(json.loads(sys.argv[1]))
