"""Crash consistency: a training run killed with SIGKILL at random moments, checkpoint writes included,
then resumed, ends with an adapter bit-identical to an uninterrupted run's (or, killed before its first
checkpoint, refuses --resume in one line and starts again with --overwrite).

The kills are real (`kill -9` of a `lorakit train` process, tests/crash_child.py); the moments are drawn
by a seeded generator, one in each tenth of the changes the run makes to its files, which reaches every
state a crash at any instant can leave (crash_child's docstring says why). Resumes run in-process.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.checkpoint import has_checkpoint
from tests.hostile import assert_refused, run_cli

CHILD = Path(__file__).with_name("crash_child.py")
TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good.\n" * 30
STEPS = 6
KILLS = 10


def _argv(tiny_base, data, out) -> list[str]:
    return ["train", "--base", str(tiny_base), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "2", "--seq-len", "16", "--r", "4", "--dropout", "0.1", "--dtype", "fp32",
            "--checkpoint-every", "1", "--quiet"]


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """A process that runs lorakit jobs and kills them at a given change (tests/crash_child.py)."""
    log = tmp_path_factory.mktemp("crash-log") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=CHILD.parent.parent)

    def run(root: Path, kill_at: int, argv: list[str]) -> dict:
        proc.stdin.write(json.dumps({"root": str(root), "kill_at": kill_at, "argv": argv}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, log.read_text()[-3000:]
        return json.loads(line)

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.mark.slow
def test_a_run_killed_at_random_moments_resumes_to_the_same_adapter(child, tiny_base, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    straight = tmp_path / "straight"
    done = child(straight, 0, _argv(tiny_base, data, straight))
    assert done["code"] == 0, done
    want = (straight / "adapter_model.safetensors").read_bytes()
    rng, bounds = random.Random(15), [round(i * done["changes"] / KILLS) for i in range(KILLS + 1)]
    moments = [rng.randint(lo + 1, hi) for lo, hi in zip(bounds, bounds[1:])]  # one in each tenth of the run
    outcomes = []
    for moment in moments:
        out = tmp_path / f"killed-{moment}"
        argv = _argv(tiny_base, data, out)
        killed = child(out, moment, argv)
        assert killed["signal"] == signal.SIGKILL, (moment, killed)
        if has_checkpoint(out / "checkpoint"):
            outcome = "resumed"
            run = run_cli([*argv, "--resume"])
            assert run.code == 0 and "Traceback" not in run.err, (moment, run.err)
        elif (out / "training_summary.json").exists():  # killed while removing the finished run's checkpoint
            outcome = "finished"
            assert_refused(run_cli([*argv, "--resume"]), 2, "finished")
        else:  # killed before the first checkpoint was in place: nothing to resume; --overwrite starts again
            outcome = "restarted"
            assert_refused(run_cli([*argv, "--resume"]), 2, "nothing to resume")
            run = run_cli([*argv, "--overwrite"])
            assert run.code == 0 and "Traceback" not in run.err, (moment, run.err)
        assert (out / "adapter_model.safetensors").read_bytes() == want, (moment, outcome)
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1)), (moment, outcome, steps)
        left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        assert outcome == "finished" or not left, (moment, left)  # no staging, swap or temporary leftovers
        outcomes.append(outcome)
    assert outcomes.count("resumed") >= KILLS // 2, list(zip(moments, outcomes))  # most kills hit a checkpointed run
