"""Real sizes: lorakit vs PEFT on bases shaped like Qwen2-0.5B and Llama-2-7B (and a 13B fit check).

    make bench-scale                                         # everything below, a few hours on 2 cores
    .venv/bin/python benchmarks/scale.py --only train        # one workload: build, train, qlora, merge, fit13b
    .venv/bin/python benchmarks/scale.py --lock /work/bigmem.lock   # take this lock around each heavy run

The bases are built from their configs with random bf16 weights (no download), tensor by tensor
straight into safetensors shards (never the whole model in memory), and cached under
~/.cache/lorakit-bench (LORAKIT_BENCH_CACHE). The 13B base (26 GB) is removed after its check unless
--keep-13b. Every measured run is a fresh process, so its peak RSS (the whole process, imports
included, `ru_maxrss`) is that command's own; timed steps are medians after a warm-up step.

- train (0.5B shape, r=16 all-linear, batch 4x512 by default): `lorakit train` vs PEFT in a plain
  loop (same model, same dtype, same batches). Targets: >= 1.3x PEFT's speed, <= 0.5x its memory.
- qlora (r=16 on q_proj,v_proj, batch 1x128): `lorakit train --quantize nf4` vs PEFT on transformers +
  bitsandbytes 4-bit (NF4, double quant) on the CPU, on the 7B shape cut to 2 layers; the whole 7B shape
  with lorakit alone (unless --peft-qlora-7b). Both checkpoint activations (lorakit's default with
  --quantize; PEFT's gradient_checkpointing_enable, as the QLoRA recipe does). Target: peak RSS <= 6 GB at 7B.
- merge: `lorakit merge --dtype bf16` vs PEFT's merge_and_unload + save_pretrained, on the 0.5B shape
  (r=16 all-linear); on the 7B shape (r=16 on q,v) lorakit alone unless --peft-merge-7b. Timed as the
  whole process (interpreter start, imports, merge, write), for both. Target: 7B <= 4 GB.
- fit13b: one QLoRA step on the 13B shape fits in 24 GB.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CACHE = Path(os.environ.get("LORAKIT_BENCH_CACHE", Path.home() / ".cache" / "lorakit-bench"))

# Public configs of the real models (random weights here).
SHAPES = {
    "qwen2-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # The 7B shape cut to 2 of its 32 layers: where PEFT + bitsandbytes runs side by side in minutes
    # (bitsandbytes' CPU quantizer takes ~6.5 s per 4096x4096 weight here: ~45 min to load the whole 7B).
    "llama-2-7b-2layers": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                               max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


# -- the bases ----------------------------------------------------------------------------------------


def build_base(name: str) -> Path:
    """The cached base directory for SHAPES[name], built if missing: config, the embedded base's tokenizer
    (its ids fit every vocabulary here) and bf16 weights, produced and written one tensor at a time."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from lorakit.base import EMBEDDED_BASE
    from lorakit.streaming import skeleton
    from lorakit.tensorfiles import Planned, write_shards

    directory = CACHE / name
    if (directory / ".complete").is_file():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shape = dict(SHAPES[name])
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_BASE)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.dtype = torch.bfloat16
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model = skeleton(config, torch.bfloat16)  # names and shapes, no memory
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}

    # Drawing 6.7B normal values takes half an hour on 2 busy cores; each weight is instead a window of one
    # pool of 64M draws, starting at an offset from its name's hash (memcpy speed, still N(0, 0.02) values).
    pool = (torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def produce(key: str, shape: tuple[int, ...]):
        def make():
            if key.endswith("norm.weight"):
                return torch.ones(shape, dtype=torch.bfloat16)
            n, start = math.prod(shape), zlib.crc32(key.encode()) % pool.numel()
            reps = -(-(start + n) // pool.numel())
            return (pool.repeat(reps) if reps > 1 else pool)[start:start + n].reshape(shape).clone()
        return make

    plan = [Planned(k, torch.bfloat16, tuple(p.shape), produce(k, tuple(p.shape)))
            for k, p in model.state_dict().items() if k not in tied]
    start = time.perf_counter()
    write_shards(directory, plan, max_shard_bytes=2 * 1024 ** 3)
    (directory / ".complete").write_text("")
    size = sum(p.nbytes for p in plan)
    print(f"built {name}: {size / 1e9:.2f} GB of bf16 weights in {time.perf_counter() - start:.0f} s -> {directory}",
          flush=True)
    return directory


def random_adapter(base: Path, out: Path, targets: list[str], r: int = 16, seed: int = 0) -> Path:
    """A PEFT-format adapter for `base` with random A and B (a trained adapter's shapes, non-zero update)."""
    import torch
    from transformers import AutoConfig

    import lorakit
    from lorakit.io import write_adapter
    from lorakit.streaming import skeleton

    if (out / "adapter_model.safetensors").is_file():
        return out
    model = skeleton(AutoConfig.from_pretrained(base), torch.float32)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, module.in_features, generator=g) * 0.02
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=g) * 0.02
    config = lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, base_model_name_or_path=str(base))
    return write_adapter(out, config, tensors)


def corpus(directory: Path) -> Path:
    """Training text: the shipped KJV corpus (plenty of rows of 512 tokens)."""
    from lorakit.base import CORPORA

    return CORPORA / "kjv" / "train.txt"


# -- the measured runs (each in a child process) -------------------------------------------------------


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _step_seconds_from_metrics(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)]
    return [t / r["tokens_per_s"] for t, r in zip(tokens, rows)]


def child_lorakit_train(args: dict) -> dict:
    """`lorakit train` as a user runs it; seconds per step from its metrics.jsonl."""
    from lorakit.cli import main

    out = Path(args["out"])
    start = time.perf_counter()
    code = main(["train", "--base", args["base"], "--data", args["data"], "--out", str(out), "--overwrite",
                 "--r", "16", "--alpha", "32", "--targets", args["targets"], "--batch-size", str(args["batch"]),
                 "--seq-len", str(args["seq"]), "--steps", str(args["steps"]), "--dtype", args["dtype"],
                 "--checkpoint-every", "100000", "--quiet", *args.get("extra", [])])
    seconds = _step_seconds_from_metrics(out)
    return {"code": code, "step_seconds": seconds, "total_seconds": time.perf_counter() - start}


def child_peft_train(args: dict) -> dict:
    """PEFT in a plain loop: from_pretrained (optionally bitsandbytes 4-bit), get_peft_model, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.base import DTYPES
    from lorakit.data import collate, load_examples

    torch.manual_seed(0)
    dtype = DTYPES[args["dtype"]]
    start = time.perf_counter()
    kwargs = {"dtype": dtype}
    if args.get("bnb"):
        from transformers import BitsAndBytesConfig

        kwargs = {"dtype": dtype, "device_map": "cpu", "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)}
    model = AutoModelForCausalLM.from_pretrained(args["base"], **kwargs)
    load_seconds = time.perf_counter() - start
    targets = args["targets"] if args["targets"] == "all-linear" else args["targets"].split(",")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))
    if args.get("checkpointing"):  # as lorakit's QLoRA default: each layer recomputed in the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(args["base"])
    examples, _ = load_examples(Path(args["data"]), tokenizer, args["seq"], "all")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = []
    for step in range(args["steps"]):
        batch = collate(examples[step * args["batch"]:(step + 1) * args["batch"]], tokenizer.pad_token_id)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    return {"code": 0, "step_seconds": seconds, "load_seconds": load_seconds}


def child_lorakit_merge(args: dict) -> dict:
    """`lorakit merge` as a user runs it (timed as the whole process, by run_child)."""
    from lorakit.cli import main

    code = main(["merge", "--base", args["base"], "--adapter", args["adapter"], "--out", args["out"],
                 "--dtype", args["dtype"], "--overwrite"])
    return {"code": code}


def child_peft_merge(args: dict) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.base import DTYPES

    model = AutoModelForCausalLM.from_pretrained(args["base"], dtype=DTYPES[args["dtype"]])
    model = PeftModel.from_pretrained(model, args["adapter"]).merge_and_unload()
    model.save_pretrained(args["out"])
    return {"code": 0}


CHILDREN = {f.__name__.removeprefix("child_"): f for f in (child_lorakit_train, child_peft_train,
                                                           child_lorakit_merge, child_peft_merge)}


@contextmanager
def _locked(path: str | None):
    """Hold an exclusive flock on `path` (other heavy jobs on a shared machine wait), or nothing."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_child(kind: str, args: dict, lock: str | None) -> dict:
    """One measured run in a fresh process; returns its result plus its whole-process peak RSS."""
    with _locked(lock):
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)], capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"code": proc.returncode, "error": " | ".join(tail), "peak_mb": None, "load": load_before}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"], result["wall_seconds"] = load_before, wall
    return result


def _median_after_warmup(seconds: list[float]) -> float | None:
    timed = seconds[1:] or seconds
    return statistics.median(timed) if timed else None


# -- the workloads -------------------------------------------------------------------------------------


def workload_train(a) -> list[dict]:
    base = build_base("qwen2-0.5b")
    common = dict(base=str(base), data=str(corpus(base)), targets="all-linear", batch=a.batch, seq=a.seq,
                  steps=a.steps, dtype=a.dtype)
    rows = []
    for round_ in range(a.rounds):  # alternate, so load on the shared machine hits both alike
        ours = run_child("lorakit_train", {**common, "out": str(CACHE / "runs" / "train-0.5b")}, a.lock)
        theirs = run_child("peft_train", common, a.lock)
        rows.append(_row(f"train 0.5B r16 all-linear {a.batch}x{a.seq} ({a.dtype})", ours, theirs))
    return rows


def workload_qlora(a) -> list[dict]:
    """QLoRA r=16 on q,v, batch 1x128: side by side with PEFT + bitsandbytes on the 2-layer cut of the 7B
    shape; the whole 7B shape with lorakit alone unless --peft-qlora-7b."""
    rows = []
    for shape, peft in (("llama-2-7b-2layers", True), ("llama-2-7b", a.peft_qlora_7b)):
        base = build_base(shape)
        common = dict(base=str(base), data=str(corpus(base)), targets="q_proj,v_proj", batch=1, seq=128,
                      steps=a.steps, dtype=a.dtype)
        ours = run_child("lorakit_train", {**common, "out": str(CACHE / "runs" / f"qlora-{shape}"),
                                           "extra": ["--quantize", "nf4"]}, a.lock)
        # lorakit checkpoints activations by default with --quantize; PEFT does it here too (the QLoRA recipe's
        # prepare_model_for_kbit_training turns it on), so that both recompute each layer in the backward
        theirs = run_child("peft_train", {**common, "bnb": True, "checkpointing": True}, a.lock) \
            if peft and not a.skip_peft else {}
        rows.append(_row(f"QLoRA {shape} r16 q,v 1x128 ({a.dtype})", ours, theirs,
                         target_mb=6000 if shape == "llama-2-7b" else None))
    return rows


def workload_merge(a) -> list[dict]:
    """Merge an r=16 adapter into the base, bf16 out: side by side with PEFT on the 0.5B shape; on the 7B
    shape lorakit alone unless --peft-merge-7b (PEFT holds the whole 13.5 GB base, twice while saving)."""
    rows = []
    for shape, targets, peft in (("qwen2-0.5b", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], True),
                                 ("llama-2-7b", ["q_proj", "v_proj"], a.peft_merge_7b)):
        base = build_base(shape)
        adapter = random_adapter(base, CACHE / "adapters" / f"{shape}-r16", targets)
        out = CACHE / "runs" / f"merged-{shape}"
        common = dict(base=str(base), adapter=str(adapter), dtype="bf16")
        ours = run_child("lorakit_merge", {**common, "out": str(out)}, a.lock)
        shutil.rmtree(out, ignore_errors=True)
        theirs = {}
        if peft and not a.skip_peft:
            theirs = run_child("peft_merge", {**common, "out": str(out)}, a.lock)
            shutil.rmtree(out, ignore_errors=True)
        rows.append(_row(f"merge {shape} r16 {','.join(t.removesuffix('_proj') for t in targets)} (bf16 out)",
                         ours, theirs, target_mb=4000 if shape == "llama-2-7b" else None))
    return rows


def workload_fit13b(a) -> list[dict]:
    base = build_base("llama-2-13b")
    args = dict(base=str(base), data=str(corpus(base)), targets="q_proj,v_proj", batch=1, seq=128, steps=2,
                dtype=a.dtype, out=str(CACHE / "runs" / "qlora-13b"), extra=["--quantize", "nf4"])
    ours = run_child("lorakit_train", args, a.lock)
    if not a.keep_13b:
        shutil.rmtree(base, ignore_errors=True)
    return [_row(f"QLoRA 13B r16 q,v 1x128 ({a.dtype}): fits 24 GB?", ours, {}, target_mb=24000)]


def _row(name: str, ours: dict, theirs: dict, target_mb: float | None = None) -> dict:
    row = {"workload": name, "lorakit": ours, "peft": theirs, "target_mb": target_mb}
    ours_s, theirs_s = (_median_after_warmup(r.get("step_seconds", [])) if r else None for r in (ours, theirs))
    # a merge is timed as its whole process (interpreter, imports, the merge, the write): the same for both
    ours_s = ours_s or ours.get("wall_seconds")
    theirs_s = theirs_s or (theirs.get("wall_seconds") if theirs else None)
    row["lorakit_s"], row["peft_s"] = ours_s, theirs_s
    row["speedup"] = theirs_s / ours_s if ours_s and theirs_s else None
    peaks = ours.get("peak_mb"), theirs.get("peak_mb") if theirs else None
    row["memory_ratio"] = peaks[0] / peaks[1] if all(peaks) else None
    return row


WORKLOADS = {"train": workload_train, "qlora": workload_qlora, "merge": workload_merge, "fit13b": workload_fit13b}


def _cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def _cell(result: dict, seconds: float | None) -> str:
    if not result:
        return "-"
    if "error" in result or not result.get("peak_mb"):
        return f"failed (exit {result.get('code')}): {result.get('error', '')[:120]}"
    peak = result.get("peak_mb")
    return f"{seconds:,.1f} s, {peak / 1e3:,.2f} GB" if seconds and peak else f"{peak / 1e3:,.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="train,qlora,merge,fit13b", help="workloads, comma-separated")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: what --dtype auto picks here)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is a warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="alternating lorakit/PEFT rounds (train)")
    parser.add_argument("--lock", default=None, help="flock this file around each heavy run (a shared machine)")
    parser.add_argument("--skip-peft", action="store_true", help="measure lorakit only (qlora, merge)")
    parser.add_argument("--keep-13b", action="store_true", help="keep the 26 GB 13B base in the cache")
    parser.add_argument("--peft-qlora-7b", action="store_true", help="also run PEFT + bitsandbytes QLoRA on the "
                        "whole 7B base (bitsandbytes' CPU quantizer needs ~45 min to load it here)")
    parser.add_argument("--peft-merge-7b", action="store_true", help="also run PEFT's merge of the 7B base "
                        "(needs ~30 GB of free memory)")
    parser.add_argument("--build", action="store_true", help="only build the bases of --only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        result = CHILDREN[a.child[0]](json.loads(a.child[1]))
        result["peak_mb"] = _peak_mb()
        print(json.dumps(result))
        return
    import torch

    from lorakit.base import resolve_dtype
    from lorakit.train import dtype_name

    a.dtype = a.dtype or dtype_name(resolve_dtype("auto", torch.device("cpu")))
    names = a.only.split(",")
    if a.build:
        for name in names:
            for shape in {"train": ["qwen2-0.5b"], "qlora": ["llama-2-7b-2layers", "llama-2-7b"],
                          "merge": ["qwen2-0.5b", "llama-2-7b"], "fit13b": ["llama-2-13b"]}[name]:
                build_base(shape)
        return
    print(f"CPU flags: {_cpu_flags()}; {os.cpu_count()} cores; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} (a shared machine: other jobs ran alongside)", flush=True)
    rows = []
    for name in names:
        for row in WORKLOADS[name](a):
            rows.append(row)
            print(f"| {row['workload']} | {_cell(row['lorakit'], row['lorakit_s'])} | "
                  f"{_cell(row['peft'], row['peft_s'])} | "
                  f"{'%.2fx' % row['speedup'] if row['speedup'] else '-'} | "
                  f"{'%.2fx' % row['memory_ratio'] if row['memory_ratio'] else '-'} | "
                  f"{'%.0f GB' % (row['target_mb'] / 1e3) if row['target_mb'] else '-'} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
