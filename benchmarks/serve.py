"""Serving under load, on loopback, with its own load generator: `lorakit serve` as a separate process.

    make bench-serve                                   # or: .venv/bin/python benchmarks/serve.py
    .venv/bin/python benchmarks/serve.py --seconds 10 --json out.json

1. Throughput: 8 concurrent clients, each sending greedy completions back to back for a fixed time,
   (a) all on one adapter, (b) spread over 4 adapters of ranks 8/16/8/4, both on the batching
   server in alternating phases (3 rounds, so outside load hits both alike), and (c) spread over 4 adapters on a naive server that runs one request at a time
   (--max-batch 1). Tokens/s and per-request p50/p95 latency. Target: (b) >= 0.85x (a).
2. Hot swap: the same clients while another thread loads and unloads two adapters every ~100 ms.
   Every answer is checked against a reference greedy output taken beforehand with no swapping:
   target zero failed requests and zero answers from the wrong adapter. A request for an adapter
   that is unloaded at that moment gets a clean 404 (counted apart; that is the right answer).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from benchmarks.common import load_average, machine  # noqa: E402

PROMPTS = ["The ship", "In the beginning", "A function that", "The king said", "Water is", "Once upon a time",
           "The module", "And the people"]
RANKS = {"a": 8, "b": 16, "c": 8, "d": 4}
CLIENTS = 8
ROUNDS = 3  # alternating phases of the 1-adapter and 4-adapter runs
MAX_TOKENS = 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lorakit serve` in a subprocess on a free loopback port."""

    def __init__(self, adapter_dir: Path, max_batch: int, adapters: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "lorakit", "serve", "--port", str(self.port), "--max-batch", str(max_batch),
                "--adapter-dir", str(adapter_dir), "--max-waiting", "256"]
        for name in adapters:
            args += ["--adapter", f"{name}={adapter_dir / name}"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.process.stderr.read()}")
            time.sleep(0.2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)


def complete(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    return client.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def load_test(url: str, models_for_client, seconds: float, check=None) -> dict:
    """CLIENTS threads sending requests back to back for `seconds`; latencies, tokens, failures."""
    results: list[tuple[float, int]] = []
    failures: list[str] = []
    not_loaded = [0]
    wrong: list[str] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + seconds

    def client(i: int):
        models = models_for_client(i)
        n = 0
        with httpx.Client() as http:
            while time.monotonic() < stop_at:
                model, prompt = models[n % len(models)], PROMPTS[(i + n) % len(PROMPTS)]
                n += 1
                t0 = time.monotonic()
                try:
                    r = complete(http, url, model, prompt)
                except httpx.HTTPError as err:
                    with lock:
                        failures.append(f"{model}: {type(err).__name__}")
                    continue
                elapsed = time.monotonic() - t0
                with lock:
                    if r.status_code == 404 and check is not None:
                        not_loaded[0] += 1  # unloaded just now: a client would retry a little later
                        time.sleep(0.05)
                    elif r.status_code != 200:
                        failures.append(f"{model}: {r.status_code} {r.text[:100]}")
                    else:
                        body = r.json()
                        results.append((elapsed, body["usage"]["completion_tokens"]))
                        if check is not None and not check(model, prompt, body["choices"][0]["text"]):
                            wrong.append(f"{model}/{prompt!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {"requests": len(results), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies) if latencies else float("nan"), "p95_s": pct(0.95),
            "failed": len(failures), "failures": failures[:5], "wrong": len(wrong), "wrong_examples": wrong[:5],
            "not_loaded_404": not_loaded[0], "latencies": latencies}


def pooled(parts: list[dict]) -> dict:
    """Several load_test phases as one: summed tokens and time, latencies pooled."""
    latencies = sorted(x for p in parts for x in p["latencies"])
    tokens, wall = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
    return {"requests": len(latencies), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "failed": sum(p["failed"] for p in parts), "failures": [f for p in parts for f in p["failures"]][:5],
            "wrong": 0, "wrong_examples": [], "not_loaded_404": 0, "latencies": latencies}


def make_adapters(directory: Path) -> None:
    from tests.serving import make_adapters as make

    make(directory, RANKS)


def references(url: str, models: list[str]) -> dict[tuple[str, str], str]:
    """Greedy outputs per (adapter, prompt), one request at a time on a quiet server."""
    with httpx.Client() as http:
        return {(m, p): complete(http, url, m, p).json()["choices"][0]["text"] for m in models for p in PROMPTS}


def swap_loop(url: str, names: list[str], stop: threading.Event, period: float, log: dict) -> None:
    """Load and unload `names` in turn every `period` seconds until `stop` is set."""
    loaded = {n: False for n in names}
    i = 0
    with httpx.Client() as http:
        while not stop.is_set():
            name = names[i % len(names)]
            i += 1
            path = "/v1/unload_lora_adapter" if loaded[name] else "/v1/load_lora_adapter"
            t0 = time.monotonic()
            r = http.post(url + path, json={"lora_name": name, "lora_path": name}, timeout=30)
            log["ops"] += 1
            log["op_ms"].append((time.monotonic() - t0) * 1e3)
            if r.status_code == 200:
                loaded[name] = not loaded[name]
            else:
                log["op_failures"].append(f"{path} {name}: {r.status_code} {r.text[:100]}")
            stop.wait(period)


def run(seconds: float = 20.0) -> dict:
    out: dict = {"machine": machine(), "load_before": load_average(), "clients": CLIENTS, "max_tokens": MAX_TOKENS}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp)
        make_adapters(adapter_dir)
        names = list(RANKS)
        with Server(adapter_dir, max_batch=16, adapters=names) as server:
            load_test(server.url, lambda i: names, 3)  # warm-up
            # alternate short phases, so a burst of load from elsewhere hits both alike
            runs = {"one_adapter": [], "four_adapters": []}
            for _ in range(ROUNDS):
                runs["one_adapter"].append(load_test(server.url, lambda i: ["a"], seconds / ROUNDS))
                runs["four_adapters"].append(load_test(server.url, lambda i: [names[i % 4]], seconds / ROUNDS))
            for key, parts in runs.items():
                out[key] = pooled(parts)
            out["round_ratios"] = [f["tokens_per_s"] / o["tokens_per_s"]
                                   for o, f in zip(runs["one_adapter"], runs["four_adapters"])]
        with Server(adapter_dir, max_batch=1, adapters=names) as server:
            out["naive_four_adapters"] = load_test(server.url, lambda i: [names[i % 4]], seconds)

        # hot swap: a and b stay; c and d are loaded and unloaded every ~100 ms under the same load
        with Server(adapter_dir, max_batch=16, adapters=names) as server:
            expected = references(server.url, names)
            for name in ("c", "d"):
                httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
            stop, log = threading.Event(), {"ops": 0, "op_ms": [], "op_failures": []}
            swapper = threading.Thread(target=swap_loop, args=(server.url, ["c", "d"], stop, 0.1, log))
            swapper.start()
            try:
                out["hot_swap"] = load_test(server.url, lambda i: [names[i % 4]], seconds,
                                            check=lambda m, p, text: expected[(m, p)] == text)
            finally:
                stop.set()
                swapper.join()
            out["hot_swap"].update(swap_ops=log["ops"], swap_op_ms_median=statistics.median(log["op_ms"]),
                                   swap_op_failures=log["op_failures"][:5])
    out["load_after"] = load_average()
    out["ratio_four_vs_one"] = out["four_adapters"]["tokens_per_s"] / out["one_adapter"]["tokens_per_s"]
    out["speedup_vs_naive"] = out["four_adapters"]["tokens_per_s"] / out["naive_four_adapters"]["tokens_per_s"]
    return out


def report(out: dict) -> str:
    lines = [f"machine: {out['machine']}; load average {out['load_before']:.2f} -> {out['load_after']:.2f}",
             f"{out['clients']} clients, greedy completions of {out['max_tokens']} tokens, back to back",
             "", f"{'scenario':<34}{'tokens/s':>10}{'requests':>10}{'p50 s':>8}{'p95 s':>8}{'failed':>8}"]
    for key, label in (("one_adapter", "batching, all on 1 adapter"), ("four_adapters", "batching, over 4 adapters"),
                       ("naive_four_adapters", "naive (1 at a time), 4 adapters"),
                       ("hot_swap", "batching, 4 adapters + hot swap")):
        r = out[key]
        lines.append(f"{label:<34}{r['tokens_per_s']:>10.1f}{r['requests']:>10}{r['p50_s']:>8.2f}{r['p95_s']:>8.2f}"
                     f"{r['failed']:>8}")
    swap = out["hot_swap"]
    rounds = ", ".join(f"{r:.2f}" for r in out["round_ratios"])
    lines += ["", f"4 adapters / 1 adapter throughput: {out['ratio_four_vs_one']:.2f}x (target >= 0.85; "
                  f"per alternating round: {rounds})",
              f"batching / naive throughput (4 adapters): {out['speedup_vs_naive']:.2f}x",
              f"hot swap: {swap['swap_ops']} load/unload operations (median {swap['swap_op_ms_median']:.0f} ms), "
              f"{swap['requests']} answers checked: {swap['failed']} failed, {swap['wrong']} wrong adapter, "
              f"{swap['not_loaded_404']} clean 404s while unloaded (targets: 0 failed, 0 wrong)"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load phase (default 20)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = run(args.seconds)
    print(report(out))
    if args.json:
        for key in ("one_adapter", "four_adapters", "naive_four_adapters", "hot_swap"):
            out[key].pop("latencies", None)
        args.json.write_text(json.dumps(out, indent=2))
    ok = out["hot_swap"]["failed"] == 0 and out["hot_swap"]["wrong"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
