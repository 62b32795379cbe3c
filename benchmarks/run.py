"""Run every benchmark and print a table of lorakit vs PEFT measured in the same run.

    make bench                               # or: .venv/bin/python benchmarks/run.py
    .venv/bin/python benchmarks/run.py --quick               # small shapes, few repeats: a smoke run
    .venv/bin/python benchmarks/run.py --only train,load --json out.json

Benchmarks: layer (one LoRA linear), train (1-3: step speed, vs forward), memory (4: peak step
memory, each run in a fresh process), compile (1-3 with torch.compile
on both sides), inference (5), decode (8: the serving engine's step, 8 adapters in one batch),
load (6), e2e (7: `lorakit train` tokens/s and MFU). Timings are medians after warm-up, lorakit and
PEFT interleaved. The machine is shared: the load average is printed before and after, and numbers
taken with the load above the core count are noise, not results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import decode, end_to_end, inference, layer, load, train_step  # noqa: E402
from benchmarks.common import load_average, machine  # noqa: E402

SUITES = {
    "layer": lambda a: layer.run(rounds=a.rounds, quick=a.quick),
    # one sample per function per round: the finest interleaving, so bursts of load hit all alike
    "train": lambda a: train_step.run(rounds=2 * a.rounds, repeats=1, quick=a.quick),
    "memory": lambda a: train_step.run_memory(quick=a.quick),
    "compile": lambda a: train_step.run_compiled(rounds=3 * a.rounds, quick=a.quick),
    "inference": lambda a: inference.run(rounds=2 * a.rounds, repeats=1, quick=a.quick),
    "decode": lambda a: decode.run(steps=40 * a.rounds, quick=a.quick),
    "load": lambda a: load.run(rounds=6 if a.quick else 30, quick=a.quick),
    "e2e": lambda a: end_to_end.run(quick=a.quick),
}


def _ms(t: dict) -> str:
    return f"{t['median'] * 1e3:,.1f} ms [{t['min'] * 1e3:,.1f}-{t['max'] * 1e3:,.1f}]"


def describe(row: dict) -> tuple[str, str, str]:
    """(lorakit, PEFT, value) cells for the summary table."""
    unit = row["unit"]

    def fmt(v):
        if v is None:
            return "-"
        if unit == "overhead":
            return f"{100 * v:+.1f}%"
        if unit in ("ms", "tokens/s"):
            return f"{v:,.1f} {unit}"
        return f"{v:.2f}x {unit[2:]}" if unit.startswith("x ") else f"{v:.2f} {unit}"

    if "lorakit_mb" in row:
        return f"{row['lorakit_mb']:,.0f} MB", f"{row['peft_mb']:,.0f} MB", fmt(row["value"])
    if row["id"] == 7:
        return (f"{row['value']:,.0f} tokens/s", "-",
                f"MFU {100 * row['mfu']:.0f}% ({row['achieved_gflops']:.1f} of {row['peak_gflops']:.1f} GFLOP/s)")
    ours = _ms(row["lorakit"]) if "lorakit" in row else "-"
    theirs = _ms(row["peft"]) if "peft" in row else "-"
    value = fmt(row["value"])
    if "peft_value" in row:
        value += f" (PEFT {fmt(row['peft_value'])})"
    return ours, theirs, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats: checks that all runs")
    parser.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suites = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    print(f"machine: {machine()}, {os.cpu_count()} cores")
    loads = [load_average()]
    print(f"load average at start: {loads[0]:.2f}", flush=True)
    started = time.perf_counter()
    rows = []
    for name in suites:
        t0 = time.perf_counter()
        got = SUITES[name](args)
        loads.append(load_average())
        print(f"  {name}: {time.perf_counter() - t0:.0f} s, load {loads[-1]:.2f}", flush=True)
        rows += got
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end {loads[-1]:.2f}"
          f" (max seen {max(loads):.2f})\n")
    header = ("#", "benchmark", "lorakit", "PEFT", "result", "target", "status")
    table = [header]
    for row in rows:
        status = "-" if row["met"] is None else ("MET" if row["met"] else "MISSED")
        table.append((str(row["id"] or "L"), row["benchmark"], *describe(row), row["target"], status))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nsetups:")
    for row in rows:
        print(f"  {row['id'] or 'L'} {row['benchmark']}: {row['setup']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "loads": loads, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
