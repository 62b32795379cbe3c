"""`lorakit serve`: many adapters on one base behind an OpenAI-compatible HTTP API, plus a playground.

    lorakit serve --adapter legal=adapters/legal --adapter poetry=adapters/poetry --api-key $KEY
    lorakit serve --adapter-dir adapters/          # POST /v1/load_lora_adapter may load from there
    lorakit serve --base ~/models/big --quantize nf4 --adapter q=adapters/q   # a 4-bit base (QLoRA)

Routes (vLLM's names, so existing clients work; served by `lorakit.serve.api`):
    GET  /                          the playground page
    GET  /health                    liveness and queue depth (no key needed)
    GET  /v1/models                 the base and every loaded adapter
    POST /v1/completions            `model` picks the adapter; the base's name means no adapter
    POST /v1/chat/completions       both with "stream": true as server-sent events
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: path inside --adapter-dir
    POST /v1/unload_lora_adapter    {"lora_name"}: requests in flight on it finish first

lorakit's one extension: a request may carry "adapters": {"name": scale, ...} to mix adapters at
scales (with the OpenAI client: `extra_body={"adapters": {...}}`); then `model` may be the base's name.

This module is the server's startup and command line; `lorakit.serve.config` holds its settings,
`lorakit.serve.api` its HTTP side and `lorakit.serve.engine` the batching loop that owns the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from lorakit.errors import UserError
from lorakit.options import add_options, options
from lorakit.serve.api import Registry, ServedAdapter, create_app, is_loopback, servable
from lorakit.serve.config import ServeConfig
from lorakit.serve.engine import Engine


def _end_ids(model, tokenizer) -> set[int]:
    """Tokens that end a generation: the tokenizer's end of text and the model's own (e.g. end of turn)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else ({configured} if configured is not None else set())
    return ids


# -- building and running a server ----------------------------------------------------------------


def build(config: ServeConfig, start: bool = True):
    """Load the base and the startup adapters; return (app, engine, registry), the engine running on a
    thread of its own if `start`."""
    from lorakit.base import base_name, default_device, load_base, quantize_spec, resolve_decode_dtype
    from lorakit.io import install_adapter, read_adapter
    from lorakit.packed import check_settings, pack_for_inference

    check_settings()  # LORAKIT_PACKED_WEIGHTS / LORAKIT_ONEDNN_FP32, before the model loads
    device = default_device()
    # a small model (the embedded base) serves faster in fp32 on a bf16 CPU: see resolve_decode_dtype
    dtype = resolve_decode_dtype(config.dtype, device, config.base, quantize=config.quantize)
    model, tokenizer = load_base(config.base, dtype=dtype, device=device, quantize=quantize_spec(config.quantize))
    registry = Registry(config.served_model_name or base_name(config.base))
    for name, path in config.adapters.items():
        lora_config, tensors = read_adapter(path)
        servable(lora_config, path)
        key = install_adapter(model, lora_config, tensors, registry.new_key(name), source=path)
        registry.adapters[name] = ServedAdapter(name, key, Path(path).resolve().name, lora_config.r)
    pack_for_inference(model, serving=True)  # where oneDNN's products are faster: packed once (lorakit.packed)
    engine = Engine(model, _end_ids(model, tokenizer), max_batch=config.max_batch, max_waiting=config.max_waiting,
                    dtype=dtype)
    if start:
        engine.start()
    return create_app(engine, tokenizer, registry, config), engine, registry


def serve(config: ServeConfig) -> int:
    """Run the server until Ctrl-C or SIGTERM (which finish the requests in flight first; a second one
    ends them at once, a third leaves without waiting for their clients): the engine on this (the main)
    thread, where its products run fastest (`Engine.run`), and the HTTP server on another. Returns the
    exit status: 1 if the engine stopped on an internal error (its traceback is printed), else 0."""
    import signal
    import threading

    import uvicorn

    _check_port_free(config.host, config.port)  # before the minutes of loading: fail fast, in one line
    if not is_loopback(config.host) and not config.api_key:
        print(f"lorakit serve: warning: listening on {config.host} with no --api-key; anyone who can reach it "
              "can use it", file=sys.stderr)
    app, engine, registry = build(config, start=False)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))

    def http() -> None:
        try:
            server.run()  # off the main thread it leaves the signals to us
        finally:  # it ended (it could not listen, or was told to): so does the engine
            engine.stop(wait=False)

    signals = []

    def stop_serving(signum, frame):  # on the main thread, between two Python lines of the engine's loop
        signals.append(signum)
        server.should_exit = True  # stop listening and finish the requests in flight; then the engine stops
        if len(signals) == 2:  # a second one: now. The engine ends at the step's end, failing what still runs
            engine.stop(wait=False)  # (so their answers end, and the HTTP server with them)
        elif len(signals) > 2:  # a client that does not read its answer's end holds the HTTP server up
            server.force_exit = True

    names = ", ".join([registry.base_name, *registry.adapters])
    print(f"lorakit serve: http://{config.host}:{config.port}/ (playground), OpenAI API at /v1; models: {names}",
          flush=True)
    thread = threading.Thread(target=http, name="lorakit-http", daemon=True)
    previous = {sig: signal.signal(sig, stop_serving) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        engine.run(started=thread.start)
    finally:
        server.should_exit = True
        if thread.is_alive():
            thread.join(timeout=30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine.died is not None:
        return 1
    if len(signals) > 1:
        raise KeyboardInterrupt  # stopped at once: "interrupted", as the CLI says for every command
    if not server.started:
        raise UserError(f"cannot listen on {config.host}:{config.port}; pass another --port or --host")
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port or --host") from None


def parse_adapter_arg(spec: str) -> tuple[str, str]:
    """'name=path' -> (name, path); a bare path is named after its directory."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
    if not Path(path).is_dir():
        raise UserError(f"--adapter {spec}: {path} is not a directory; use NAME=PATH to an adapter directory")
    return (name if sep else Path(spec).resolve().name), path


SPECIAL = ("adapters", "api_key")  # ServeConfig fields with hand-written flags (see register)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve many adapters on one base: OpenAI-compatible API + playground",
        description="Serve one base with many adapters behind an OpenAI-compatible API, batching requests for "
                    "different adapters into one forward pass; a playground page is at /.\n\nexamples:\n"
                    "  lorakit serve --adapter legal=adapters/legal --adapter poetry=adapters/poetry --api-key $KEY\n"
                    "  lorakit serve --adapter-dir adapters/   # then POST /v1/load_lora_adapter\n"
                    "  lorakit serve --base ~/models/big --quantize nf4 --adapter q=adapters/q   # a 4-bit base",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # Two flags are not one field each as it stands: --adapter repeats into a dict; --api-key defaults to
    # the environment's key, which --help must not print.
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter to serve under NAME (the request's model); repeat for several")
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help=next(f for f in dataclasses.fields(ServeConfig) if f.name == "api_key").metadata["help"])
    add_options(p, ServeConfig, skip=SPECIAL)

    def run(args) -> int:
        adapters = {}
        for spec in args.adapter:
            name, path = parse_adapter_arg(spec)
            if name in adapters:
                raise UserError(f"--adapter name {name!r} is given twice; give each adapter its own name")
            adapters[name] = path
        return serve(ServeConfig(adapters=adapters, api_key=args.api_key, **options(args, ServeConfig, skip=SPECIAL)))

    p.set_defaults(func=run)
