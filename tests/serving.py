"""Helpers for the serving tests: random adapters on the embedded base, a live server in a thread."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import torch

import lorakit
from lorakit.base import load_base


def make_adapters(directory: Path, ranks: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Save one random adapter per name (all linear layers of the embedded base) under `directory`."""
    paths = {}
    for i, (name, r) in enumerate(ranks.items()):
        model, _ = load_base(None)
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():  # B starts at zero; a random B makes each adapter change the text its own way
            for _, layer in lorakit.lora_layers(model):
                A, B = layer.lora_A["default"], layer.lora_B["default"]
                # A too from the seeded generator: the same adapters whatever ran before in the process
                A.copy_((torch.rand(A.shape, generator=g) * 2 - 1) / A.shape[1] ** 0.5)
                B.copy_(torch.randn(B.shape, generator=g) * 0.04)
        paths[name] = lorakit.save_adapter(model, directory / name)
    return paths


@contextlib.contextmanager
def live_server(config):
    """Run `lorakit serve`'s app on 127.0.0.1 (a free port) in a thread; yield (base_url, engine, registry)."""
    import uvicorn

    from lorakit.serve.app import build

    app, engine, registry = build(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine, registry
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
