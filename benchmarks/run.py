"""Run every benchmark and print a table of lorakit vs PEFT ratios measured in the same run.

    make bench          # or: .venv/bin/python benchmarks/run.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import layer  # noqa: E402
from benchmarks.common import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per benchmark")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {machine()}")
    rows = layer.run(rounds=args.rounds)
    for row in rows:
        print(f"\n{row['benchmark']}")
        print(f"  bare {row['bare_ms']:.2f} ms | lorakit {row['lorakit_ms']:.2f} ms "
              f"(+{100 * row['lorakit_overhead']:.1f}%) | PEFT {row['peft_ms']:.2f} ms (+{100 * row['peft_overhead']:.1f}%)")
        print(f"  lorakit overhead / PEFT overhead = {row['ratio']:.2f}  target: {row['target']}  "
              f"{'MET' if row['met'] else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
