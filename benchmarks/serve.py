"""Serving under load, on loopback, with its own load generator: `lorakit serve` beside `transformers serve`.

    make bench-serve                                   # or: .venv/bin/python benchmarks/serve.py
    .venv/bin/python benchmarks/serve.py --seconds 6 --json out.json

Every server is a separate process on the embedded base in fp32; clients send greedy completions
of 48 new tokens back to back (each client one request at a time). Phases that are compared run in
alternating rounds (A B A B ...), so a burst of load from elsewhere on a shared machine hits both
alike, and each ratio is the median of the per-round ratios.

1. Against transformers' own server: `transformers serve --continuous-batching` and `lorakit serve`
   (no adapter), 8 and 32 concurrent clients. Target: lorakit >= 1.2x tokens/s.
2. Adapters on lorakit (8 clients): all on one adapter; spread over 4 adapters (ranks 8/16/8/4, one per
   client); 4 adapters mixed in every request (`"adapters": {...}`, which transformers' server cannot
   do). Targets: spread >= 0.85x and mix >= 0.9x the one-adapter figure.
3. Log-probabilities: the same base load with `logprobs: 5`. Target: >= 0.9x the plain figure.
4. Hot swap: 8 clients over 4 adapters while another thread loads and unloads two of them every
   ~100 ms. Every answer is checked against a reference greedy output taken beforehand: target zero
   failed requests and zero answers from the wrong adapter (a request for an adapter unloaded at that
   moment gets a clean 404, counted apart).
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

BASE_DIR = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "assets" / "base"
PROMPTS = ["The ship", "In the beginning", "A function that", "The king said", "Water is", "Once upon a time",
           "The module", "And the people"]
RANKS = {"a": 8, "b": 16, "c": 8, "d": 4}
MIX = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}
MAX_TOKENS = 48
ROUNDS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free loopback port, ready when /health answers."""

    def __init__(self, args: list[str], port: int, name: str):
        self.port, self.name = port, name
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{name} did not start: {self.log.read()[-2000:]}")
            time.sleep(0.3)

    @classmethod
    def lorakit(cls, adapter_dir: Path | None = None, adapters: list[str] = (), max_batch: int = 32) -> Server:
        port = free_port()
        args = [sys.executable, "-m", "lorakit", "serve", "--port", str(port), "--max-batch", str(max_batch),
                "--dtype", "fp32", "--max-waiting", "256"]
        if adapter_dir is not None:
            args += ["--adapter-dir", str(adapter_dir)]
        for name in adapters:
            args += ["--adapter", f"{name}={adapter_dir / name}"]
        return cls(args, port, "lorakit serve")

    @classmethod
    def transformers(cls) -> Server:
        port = free_port()
        cli = Path(sys.executable).with_name("transformers")
        # Its paged KV cache takes most of the free memory by default (12 GB here); 8192 tokens is plenty
        # for 32 clients x (prompt + 48 tokens) and keeps it a good neighbour on a shared machine.
        args = [str(cli), "serve", str(BASE_DIR), "--continuous-batching", "--dtype", "float32", "--device", "cpu",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--cb-block-size", "32",
                "--cb-num-blocks", "256", "--cb-max-batch-tokens", "2048"]
        return cls(args, port, "transformers serve")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load_test(url: str, body_for, clients: int, seconds: float, check=None) -> dict:
    """`clients` threads sending requests back to back for `seconds`; tokens, latencies, failures.
    body_for(client, n) -> (JSON body, label) of that client's n-th request."""
    results: list[tuple[float, int]] = []
    failures: list[str] = []
    not_loaded = [0]
    wrong: list[str] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + seconds

    def client(i: int):
        n = 0
        with httpx.Client() as http:
            while time.monotonic() < stop_at:
                body, label = body_for(i, n)
                n += 1
                t0 = time.monotonic()
                try:
                    r = http.post(url + "/v1/completions", json=body, timeout=300)
                except httpx.HTTPError as err:
                    with lock:
                        failures.append(f"{label}: {type(err).__name__}")
                    continue
                elapsed = time.monotonic() - t0
                with lock:
                    if r.status_code == 404 and check is not None:
                        not_loaded[0] += 1  # unloaded just now: a client would retry a little later
                        time.sleep(0.05)
                    elif r.status_code != 200:
                        failures.append(f"{label}: {r.status_code} {r.text[:100]}")
                    else:
                        answer = r.json()
                        results.append((elapsed, answer["usage"]["completion_tokens"]))
                        if check is not None and not check(body, answer["choices"][0]["text"]):
                            wrong.append(label)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"requests": len(results), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies) if latencies else float("nan"),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan"),
            "failed": len(failures), "failures": failures[:5], "wrong": len(wrong), "wrong_examples": wrong[:5],
            "not_loaded_404": not_loaded[0]}


def body(model: str, prompt: str, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def alternate(phases: dict[str, tuple[str, object, int]], seconds: float, rounds: int) -> dict[str, list[dict]]:
    """Run each phase (url, body_for, clients) once per round, in turn; their per-round results."""
    out: dict[str, list[dict]] = {name: [] for name in phases}
    for _ in range(rounds):
        for name, (url, body_for, clients) in phases.items():
            out[name].append(load_test(url, body_for, clients, seconds))
    return out


def summary(parts: list[dict]) -> dict:
    rates = [p["tokens_per_s"] for p in parts]
    return {"tokens_per_s": statistics.median(rates), "rounds": rates, "requests": sum(p["requests"] for p in parts),
            "p50_s": statistics.median(p["p50_s"] for p in parts), "failed": sum(p["failed"] for p in parts),
            "failures": [f for p in parts for f in p["failures"]][:5]}


def ratio(runs: dict[str, list[dict]], a: str, b: str) -> dict:
    per_round = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b])]
    return {"median": statistics.median(per_round), "rounds": per_round}


def run(seconds: float, rounds: int, only: set[str]) -> dict:
    out: dict = {"machine": machine(), "load_before": load_average(), "max_tokens": MAX_TOKENS, "rounds": rounds,
                 "seconds": seconds, "results": {}, "ratios": {}}
    results, ratios = out["results"], out["ratios"]
    base = "lorakit/embedded"
    if "transformers" in only:
        with Server.transformers() as theirs, Server.lorakit() as ours:
            for clients in (8, 32):
                phases = {f"transformers_{clients}": (theirs.url, lambda i, n: (
                              body(str(BASE_DIR), PROMPTS[(i + n) % len(PROMPTS)]), "transformers"), clients),
                          f"lorakit_{clients}": (ours.url, lambda i, n: (
                              body(base, PROMPTS[(i + n) % len(PROMPTS)]), "lorakit"), clients)}
                load_test(theirs.url, phases[f"transformers_{clients}"][1], clients, 2)  # warm-up
                load_test(ours.url, phases[f"lorakit_{clients}"][1], clients, 2)
                runs = alternate(phases, seconds, rounds)
                results.update({k: summary(v) for k, v in runs.items()})
                ratios[f"lorakit_vs_transformers_{clients}"] = ratio(runs, f"lorakit_{clients}",
                                                                      f"transformers_{clients}")
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp)
        from tests.serving import make_adapters

        make_adapters(adapter_dir, RANKS)
        names = list(RANKS)
        if "adapters" in only:
            with Server.lorakit(adapter_dir, names) as server:
                prompt = lambda i, n: PROMPTS[(i + n) % len(PROMPTS)]  # noqa: E731
                phases = {
                    "base_8": (server.url, lambda i, n: (body(base, prompt(i, n)), "base"), 8),
                    "base_logprobs_8": (server.url, lambda i, n: (body(base, prompt(i, n), logprobs=5), "base+lp"), 8),
                    "one_adapter_8": (server.url, lambda i, n: (body("a", prompt(i, n)), "a"), 8),
                    "four_adapters_8": (server.url, lambda i, n: (body(names[i % 4], prompt(i, n)), names[i % 4]), 8),
                    "mix_of_four_8": (server.url, lambda i, n: (body(base, prompt(i, n), adapters=MIX), "mix"), 8),
                }
                load_test(server.url, phases["mix_of_four_8"][1], 8, 2)  # warm-up
                runs = alternate(phases, seconds, rounds)
                results.update({k: summary(v) for k, v in runs.items()})
                ratios["logprobs_vs_plain"] = ratio(runs, "base_logprobs_8", "base_8")
                ratios["four_spread_vs_one"] = ratio(runs, "four_adapters_8", "one_adapter_8")
                ratios["mix_of_four_vs_one"] = ratio(runs, "mix_of_four_8", "one_adapter_8")
        if "swap" in only:
            out["hot_swap"] = hot_swap(adapter_dir, names, seconds * rounds)
    out["load_after"] = load_average()
    return out


def hot_swap(adapter_dir: Path, names: list[str], seconds: float) -> dict:
    """a and b stay; c and d are loaded and unloaded every ~100 ms under 8 clients' load."""
    with Server.lorakit(adapter_dir, names, max_batch=16) as server:
        with httpx.Client() as http:
            expected = {(m, p): http.post(server.url + "/v1/completions", json=body(m, p), timeout=120)
                        .json()["choices"][0]["text"] for m in names for p in PROMPTS}
            for name in ("c", "d"):
                http.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
        stop, log = threading.Event(), {"ops": 0, "op_ms": [], "op_failures": []}
        swapper = threading.Thread(target=swap_loop, args=(server.url, ["c", "d"], stop, 0.1, log))
        swapper.start()
        try:
            result = load_test(server.url, lambda i, n: (body(names[i % 4], PROMPTS[(i + n) % len(PROMPTS)]),
                                                         names[i % 4]), 8, seconds,
                               check=lambda b, text: expected[(b["model"], b["prompt"])] == text)
        finally:
            stop.set()
            swapper.join()
    result.update(swap_ops=log["ops"], swap_op_ms_median=statistics.median(log["op_ms"]) if log["op_ms"] else 0,
                  swap_op_failures=log["op_failures"][:5])
    return result


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


LABELS = {"transformers_8": "transformers serve --continuous-batching, 8 clients",
          "lorakit_8": "lorakit serve, no adapter, 8 clients",
          "transformers_32": "transformers serve --continuous-batching, 32 clients",
          "lorakit_32": "lorakit serve, no adapter, 32 clients",
          "base_8": "lorakit, base, 8 clients",
          "base_logprobs_8": "lorakit, base + logprobs 5, 8 clients",
          "one_adapter_8": "lorakit, all on 1 adapter, 8 clients",
          "four_adapters_8": "lorakit, spread over 4 adapters, 8 clients",
          "mix_of_four_8": "lorakit, 4 adapters mixed per request, 8 clients"}
TARGETS = {"lorakit_vs_transformers_8": ("lorakit / transformers, 8 clients", 1.2),
           "lorakit_vs_transformers_32": ("lorakit / transformers, 32 clients", 1.2),
           "four_spread_vs_one": ("spread over 4 adapters / 1 adapter", 0.85),
           "mix_of_four_vs_one": ("4 adapters mixed per request / 1 adapter", 0.9),
           "logprobs_vs_plain": ("logprobs 5 / plain", 0.9)}


def report(out: dict) -> str:
    lines = [f"machine: {out['machine']}; load average {out['load_before']:.2f} -> {out['load_after']:.2f}",
             f"greedy completions of {out['max_tokens']} tokens, back to back; {out['rounds']} alternating rounds "
             f"of {out['seconds']:g} s per phase; tokens/s is the median over rounds",
             "", f"{'scenario':<54}{'tokens/s':>10}{'requests':>10}{'p50 s':>8}{'failed':>8}"]
    for key, r in out["results"].items():
        lines.append(f"{LABELS[key]:<54}{r['tokens_per_s']:>10.1f}{r['requests']:>10}{r['p50_s']:>8.2f}"
                     f"{r['failed']:>8}")
    lines.append("")
    for key, r in out["ratios"].items():
        label, target = TARGETS[key]
        rounds = ", ".join(f"{x:.2f}" for x in r["rounds"])
        verdict = "MET" if r["median"] >= target else "MISSED"
        lines.append(f"{label}: {r['median']:.2f}x (rounds {rounds}; target >= {target}: {verdict})")
    if "hot_swap" in out:
        swap = out["hot_swap"]
        lines.append(f"hot swap: {swap['tokens_per_s']:.1f} tokens/s, {swap['swap_ops']} load/unload operations "
                     f"(median {swap['swap_op_ms_median']:.0f} ms), {swap['requests']} answers checked: "
                     f"{swap['failed']} failed, {swap['wrong']} wrong adapter, {swap['not_loaded_404']} clean 404s "
                     "while unloaded (targets: 0 failed, 0 wrong)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load phase per round (default 10)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"alternating rounds (default {ROUNDS})")
    parser.add_argument("--only", default="transformers,adapters,swap",
                        help="comma-separated parts: transformers, adapters, swap (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = run(args.seconds, args.rounds, set(args.only.split(",")))
    print(report(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    swap = out.get("hot_swap", {"failed": 0, "wrong": 0})
    return 0 if swap["failed"] == 0 and swap["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
