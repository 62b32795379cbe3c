"""Benchmark 8: a DPO training step, lorakit vs TRL + PEFT, on the same model and the same batch.

The ~25M Llama-shaped model of `benchmarks/common.py`, fp32, r=16 on every linear layer but the head.
A batch of PAIRS pairs, each a PROMPT-token prompt with a COMPLETION-token chosen and rejected answer
(so 2·PAIRS rows of PROMPT+COMPLETION tokens, as TRL lays them out: chosen rows, then rejected). A step
is: the reference log-probabilities (adapters disabled, no gradients), the policy's, the DPO loss,
backward, AdamW step, zero_grad.
- lorakit: `lorakit.objectives.DPO` on a model `lorakit.inject` adapted (its fused LoRA layers and
  gated-MLP blocks; per-token log-probs chunked from the last hidden state).
- TRL: `trl.DPOTrainer` given the base and a `peft.LoraConfig`, its own collator, `compute_loss`
  (the reference by PEFT's disabled adapter, its fused log-prob head), then the same backward and AdamW.
Both losses are first checked to agree. Step times are interleaved medians; peak memory is the RSS
high-water mark above the resident model during one step, in a fresh process per library (as benchmark 4).

    .venv/bin/python benchmarks/preference.py [--quick] [--rounds N]      # or: make bench-preference
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import lorakit  # noqa: E402
from benchmarks.common import LLAMA_25M, LLAMA_SMALL, interleaved, llama, load_average, machine  # noqa: E402

R = 16
FULL = dict(shape=LLAMA_25M, pairs=4, prompt=128, completion=128)
QUICK = dict(shape=LLAMA_SMALL, pairs=2, prompt=32, completion=32)


def _token_pairs(spec: dict) -> list[tuple[list[int], list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)
    vocab = spec["shape"]["vocab_size"]

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [(ids(spec["prompt"]), ids(spec["completion"]), ids(spec["completion"])) for _ in range(spec["pairs"])]


def lorakit_step(base, spec: dict):
    from lorakit.data import Example
    from lorakit.objectives import DPO, Preference
    from lorakit.preferences import Pair

    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear"))
    model.train()
    pairs = [Pair(p, Example(c, list(c)), Example(r, list(r))) for p, c, r in _token_pairs(spec)]
    batch = DPO.collate(pairs, 0, len(pairs), 0, spec["prompt"] + spec["completion"])
    objective = DPO(model, Preference())
    return _stepper(model, lambda: objective(batch, 1.0)), model


def trl_step(base, spec: dict):
    import datasets
    import peft
    import trl
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    # TRL wants a tokenizer to build the trainer; the batch below is made of token ids directly.
    vocab = {f"t{i}": i for i in range(spec["shape"]["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", eos_token="t2", unk_token="t1")
    config = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear")
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False, fp16=False,
                         per_device_train_batch_size=spec["pairs"], save_strategy="no")
    data = datasets.Dataset.from_list([{"prompt": "t3", "chosen": "t4", "rejected": "t5"}])
    trainer = trl.DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=config)
    model = trainer.model
    model.train()
    inputs = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                    for p, c, r in _token_pairs(spec)])
    return _stepper(model, lambda: trainer.compute_loss(model, inputs)), model


def _stepper(model, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step, sum(p.numel() for p in params)


def time_steps(spec: dict, rounds: int) -> dict:
    base = llama(spec["shape"])
    ((ours, n_ours), our_model), ((theirs, n_theirs), their_model) = lorakit_step(base, spec), trl_step(base, spec)
    assert n_ours == n_theirs, f"lorakit and TRL train different parameter counts: {n_ours} vs {n_theirs}"
    # the two libraries draw lora_A differently: give TRL's PEFT adapter lorakit's, so the losses can be compared
    peers = dict(their_model.named_parameters())
    with torch.no_grad():
        for name, p in our_model.named_parameters():
            if p.requires_grad:
                peers[f"base_model.model.{name}.weight"].copy_(p)
    # B starts at zero: both first losses are log 2 exactly; a step later they must still agree
    first = (ours(), theirs())
    second = (ours(), theirs())
    assert all(abs(a - b) < 1e-4 for a, b in (first, second)), f"losses differ: {first}, {second}"
    return {"trainable": n_ours, **interleaved({"lorakit": ours, "trl": theirs}, rounds=rounds, repeats=1, warmup=1)}


def peak_memory(which: str, spec: dict) -> float:
    """Peak RSS above the resident model during one step, MB, in a fresh process (see benchmark 4)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    args = json.dumps({"which": which, "spec": {**spec, "shape": spec["shape"]}, "threads": torch.get_num_threads()})
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "benchmarks.preference", "--child", args], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _measure_peak(request: dict) -> None:
    torch.set_num_threads(request["threads"])
    spec = request["spec"]
    base = llama(spec["shape"])
    (step, _), _ = (lorakit_step if request["which"] == "lorakit" else trl_step)(base, spec)
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


def run(rounds: int = 5, quick: bool = False) -> list[dict]:
    spec = QUICK if quick else FULL
    setup = (f"{'25M' if spec['shape'] is LLAMA_25M else 'small'} model, {spec['pairs']} pairs of "
             f"{spec['prompt']}+{spec['completion']} tokens (rows {2 * spec['pairs']}x{spec['prompt'] + spec['completion']})")
    memory = {}
    for which in ("lorakit", "trl", "lorakit", "trl"):  # twice each, alternating; the smaller of each
        memory.setdefault(which, []).append(peak_memory(which, spec))
    ours_mb, trl_mb = min(memory["lorakit"]), min(memory["trl"])
    t = time_steps(spec, rounds)
    speed = t["trl"]["median"] / t["lorakit"]["median"]
    return [
        {"id": 8, "benchmark": "DPO step time, fp32 (vs TRL + PEFT)", "lorakit": t["lorakit"], "peft": t["trl"],
         "value": speed, "unit": "x faster", "target": ">= 1x (step time <= TRL's)", "met": speed >= 1.0,
         "setup": setup + f", {t['trainable']:,} trainable"},
        {"id": 8, "benchmark": "DPO step peak memory above the model, fp32 (vs TRL + PEFT)", "lorakit_mb": ours_mb,
         "peft_mb": trl_mb, "value": ours_mb / trl_mb, "unit": "x TRL", "target": "<= 0.6x TRL",
         "met": ours_mb / trl_mb <= 0.6, "setup": setup + f"; runs (MB) lorakit {memory['lorakit']}, TRL {memory['trl']}"},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: checks that everything runs")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _measure_peak(json.loads(args.child))
        return
    print(f"machine: {machine()}, {os.cpu_count()} cores; load average {load_average():.2f}", flush=True)
    for row in run(args.rounds, args.quick):
        if "lorakit_mb" in row:
            cells = f"lorakit {row['lorakit_mb']:,.0f} MB, TRL {row['peft_mb']:,.0f} MB"
        else:
            cells = (f"lorakit {row['lorakit']['median'] * 1e3:,.0f} ms [{row['lorakit']['min'] * 1e3:,.0f}-"
                     f"{row['lorakit']['max'] * 1e3:,.0f}], TRL {row['peft']['median'] * 1e3:,.0f} ms "
                     f"[{row['peft']['min'] * 1e3:,.0f}-{row['peft']['max'] * 1e3:,.0f}]")
        print(f"{row['benchmark']}: {cells} -> {row['value']:.2f} {row['unit']} "
              f"(target {row['target']}: {'MET' if row['met'] else 'MISSED'})\n  {row['setup']}")
    print(f"load average at the end {load_average():.2f}")


if __name__ == "__main__":
    main()
