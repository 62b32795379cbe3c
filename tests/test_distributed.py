"""Data-parallel training with 2 CPU processes on loopback (gloo): equivalence (DDP and FSDP), resume, failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import TrainConfig, train

TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n" * 40
pytestmark = pytest.mark.slow


def _args(base, data, out, **kw):
    values = {"--base": base, "--data": data, "--out": out, "--steps": 4, "--seq-len": 16, "--r": 4,
              "--dtype": "fp32", "--lr": 5e-3, **kw}
    return [str(x) for kv in values.items() for x in kv] + ["--quiet"]


def _single_process_run(tiny_base, tmp_path):
    """(the data file, the directory of one process trained on it with batch 4: what 2 ranks of 2 rows must give)."""
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    single = tmp_path / "single"
    train(TrainConfig(data=data, out=single, base=str(tiny_base), steps=4, seq_len=16, r=4, dtype="fp32", lr=5e-3,
                      batch_size=4, quiet=True))
    return data, single


def test_two_ranks_equal_one_process_with_twice_the_batch(tiny_base, tmp_path, launched):
    data, single = _single_process_run(tiny_base, tmp_path)
    a = load_file(single / "adapter_model.safetensors")
    b = launched()[1]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained


def _launch(tiny_base, data, out, *flags):
    subprocess.run([sys.executable, "-m", "lorakit", "train", "--nproc", "2", *flags,
                    *_args(tiny_base, data, out, **{"--batch-size": 2})], check=True, timeout=300)
    return load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def launched(tiny_base, tmp_path_factory):
    """`launched(*flags)`: (out, adapter) of `lorakit train --nproc 2 *flags` on TEXT, batch 2 per rank; each set
    of flags runs once per module (the plain DDP run is what two tests compare with)."""
    root = tmp_path_factory.mktemp("launched")
    data = root / "d.txt"
    data.write_text(TEXT)
    runs = {}

    def launch(*flags):
        if flags not in runs:
            out = root / f"run-{len(runs)}"
            runs[flags] = out, _launch(tiny_base, data, out, *flags)
        return runs[flags]

    return launch


# base precision -> its flags; NF4 is the FSDP+QLoRA recipe (the 4-bit codes are sharded too)
FSDP_BASES = {"fp32": [], "nf4": ["--quantize", "nf4"]}


@pytest.mark.parametrize("base", FSDP_BASES)
def test_fsdp_trains_the_ddp_adapter_holding_half_the_base_per_rank(launched, base):
    ddp = launched(*FSDP_BASES[base])[1]
    fsdp_out, fsdp = launched("--fsdp", *FSDP_BASES[base])
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        assert torch.allclose(ddp[key], fsdp[key], atol=1e-5, rtol=0), key
    assert any(ddp[k].abs().sum() > 0 for k in ddp if "lora_B" in k)  # it trained
    memory = json.loads((fsdp_out / "training_summary.json").read_text())["memory"]
    whole, held = memory["base_bytes"], memory["base_bytes_per_rank"]
    assert len(held) == 2
    # Half each, up to what FSDP does not split: buffers (rotary frequencies) and the padding of a
    # tensor whose first dimension is odd (measured: 50.03% fp32; 50.2% and 49.95% NF4).
    for rank_bytes in held:
        assert abs(rank_bytes - whole / 2) < 0.01 * whole, (rank_bytes, whole)


STOP_AFTER_TWO_STEPS = """import json, sys
from lorakit.train import TrainConfig, train
train(TrainConfig(**json.loads(sys.argv[1])), should_stop=lambda step: step == 2)  # Ctrl-C's path
"""


def test_fsdp_resumes_from_its_checkpoint(tiny_base, tmp_path):
    data, single = _single_process_run(tiny_base, tmp_path)
    out, script = tmp_path / "run", tmp_path / "stop.py"
    script.write_text(STOP_AFTER_TWO_STEPS)
    config = {"data": str(data), "out": str(out), "base": str(tiny_base), "steps": 4, "seq_len": 16, "r": 4,
              "dtype": "fp32", "lr": 5e-3, "batch_size": 2, "quiet": True, "fsdp": True}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
                    json.dumps(config)], check=True, timeout=300)
    assert (out / "checkpoint").is_dir() and not (out / "adapter_model.safetensors").exists()
    resumed = _launch(tiny_base, data, out, "--fsdp", "--resume")
    expected = load_file(single / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.allclose(expected[key], resumed[key], atol=1e-6, rtol=1e-5), key


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker process with LOCAL_RANK=rank below `parent` (only there: another test's job may run
    beside this one, under pytest-xdist)."""
    for process in psutil.Process(parent).children(recursive=True):
        try:
            env = process.environ()
        except psutil.Error:  # gone meanwhile
            continue
        if env.get("LOCAL_RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return process.pid
    return None


def test_a_crashed_rank_stops_the_whole_job_with_a_message(tiny_base, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text(TEXT * 5)
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "lorakit", "train", "--nproc", "2",
                            *_args(tiny_base, data, out, **{"--steps": 100000, "--batch-size": 2})],
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline and job.poll() is None:
            time.sleep(0.5)
        victim = _rank_pid(job.pid, 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)
        _, err = job.communicate(timeout=120)  # no hang: torchrun stops the surviving rank
    finally:
        if job.poll() is None:  # the ranks run in sessions of their own: they would outlive the job's group
            ranks = [pid for pid in (_rank_pid(job.pid, rank) for rank in (0, 1)) if pid is not None]
            os.killpg(job.pid, signal.SIGKILL)
            for pid in ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert job.returncode == 2
    assert "a training process failed" in err.splitlines()[-1]
