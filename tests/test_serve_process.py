"""`lorakit serve` as a process: its engine on the main thread, the HTTP server on another; Ctrl-C and
SIGTERM finish the requests in flight, then exit 0; a second signal stops at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

BASE = "lorakit/embedded"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    """A `lorakit serve` process on a free port, ready; killed if a test leaves it running."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--port", str(port), "--dtype", "fp32"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"lorakit serve did not start: {process.communicate()[1][-2000:]}")
        time.sleep(0.2)
    try:
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _finished(process) -> tuple[int, str]:
    _, err = process.communicate(timeout=60)
    return process.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_lets_the_request_in_flight_finish_then_the_server_exits_cleanly(server, signum):
    url, process = server
    body = {"model": BASE, "prompt": "The ship", "max_tokens": 48, "stream": True, "temperature": 0}
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if tokens == 0:
                process.send_signal(signum)  # mid-answer
            tokens += 1
            finish = chunk["choices"][0]["finish_reason"]
    assert finish == "length" and tokens >= 48  # the whole answer came
    code, err = _finished(process)
    assert code == 0, err
    assert "Traceback" not in err
    with pytest.raises(httpx.HTTPError):  # and it listens no more
        httpx.get(url + "/health", timeout=2)


def test_a_second_signal_stops_at_once(server):
    url, process = server
    from transformers import AutoTokenizer

    from lorakit.base import base_source

    eos = AutoTokenizer.from_pretrained(base_source(None)).eos_token_id
    body = {"model": BASE, "prompt": "The ship", "max_tokens": 400, "stream": True, "temperature": 0,
            "logit_bias": {str(eos): -100}}  # 400 tokens: seconds, far longer than the two signals take
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        code, err = _finished(process)
        try:
            chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        except httpx.HTTPError:
            pass  # the connection went with the server
    assert code == 130 and "lorakit serve: interrupted" in err, err
    assert "Traceback" not in err
    assert len(chunks) < 399 and not any(c.get("choices") and c["choices"][0]["finish_reason"] == "length"
                                         for c in chunks)  # cut short
