"""Big fresh CPU tensors with and without torch's transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`).

    .venv/bin/python benchmarks/huge_pages.py [--rounds 3]

Every `lorakit` command sets that variable before torch is imported (`lorakit.cli.huge_pages`). This
times the ops of a training step's MLP at a 0.5B base's size (2048 x 4864 fp32, 40 MB: batch 4x512),
each in a fresh process with and without the variable, rounds alternating, and prints the medians and
their ratios. glibc hands blocks over 32 MB straight from mmap, so every such output is a new mapping:
faulted in 4 KB at a time without huge pages, 2 MB at a time with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROWS, HIDDEN, INTERMEDIATE = 2048, 896, 4864


def child() -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(ROWS, INTERMEDIATE)
    h, W = torch.randn(ROWS, HIDDEN), torch.randn(INTERMEDIATE, HIDDEN)
    out = torch.empty_like(x)
    ops = {
        "silu(x), fresh output": lambda: F.silu(x),
        "x * x, fresh output": lambda: x * x,
        "empty_like(x).fill_(1)": lambda: torch.empty_like(x).fill_(1),
        "sigmoid(x, out=reused)": lambda: torch.sigmoid(x, out=out),
        "gate product h @ W.T": lambda: h @ W.t(),
    }
    result = {}
    for name, op in ops.items():
        for _ in range(3):
            op()
        times = []
        for _ in range(10 if "product" in name else 30):
            start = time.perf_counter()
            op()
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times) * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating process pairs (default 3)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child()))
        return
    runs: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
    for _ in range(a.rounds):
        for flag in ("0", "1"):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": flag}
            proc = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                                  check=True)
            runs[flag].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        mode = "unknown"
    print(f"transparent huge pages: {mode}; {a.rounds} alternating rounds, median ms per op")
    print(f"{'op on a (2048, 4864) fp32 tensor':34} {'without':>9} {'with':>9} {'speed-up':>9}")
    for name in runs["0"][0]:
        without = statistics.median(r[name] for r in runs["0"])
        with_ = statistics.median(r[name] for r in runs["1"])
        print(f"{name:34} {without:9.2f} {with_:9.2f} {without / with_:8.2f}x")


if __name__ == "__main__":
    main()
