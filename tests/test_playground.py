"""The playground page in a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import httpx
import pytest

from lorakit.serve.config import ServeConfig
from tests.serving import live_server, make_adapters

ARTIFACTS = Path(os.environ.get("LORAKIT_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI sets LORAKIT_REQUIRE_BROWSER=1 (.ci/run): there a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(not CHROMIUM and not os.environ.get("LORAKIT_REQUIRE_BROWSER"),
                                reason="no chromium on this machine (Debian: apt-get install chromium)")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def test_playground_streams_base_and_a_mix_side_by_side(tmp_path):
    from playwright.sync_api import sync_playwright

    paths = make_adapters(tmp_path, {"legal": 8, "poetry": 16})
    config = ServeConfig(adapters={k: str(v) for k, v in paths.items()}, api_key="k", max_tokens=64,
                         dtype="fp32")
    with live_server(config) as (url, _, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.fill("#api-key", "k")
        page.dispatch_event("#api-key", "change")  # the page lists the models once it has the key
        page.wait_for_selector("body[data-models=ready]")
        sliders = page.locator("#adapters input[type=range]")
        assert sliders.count() == 2
        # a "mixing ratio", set as a person would: legal's slider starts at 1, ten steps of 0.05 down;
        # poetry's starts at 0, twenty steps up
        sliders.nth(0).focus()
        for _ in range(10):
            page.keyboard.press("ArrowLeft")
        sliders.nth(1).focus()
        for _ in range(20):
            page.keyboard.press("ArrowRight")
        assert page.text_content("#mix-label") == "(legal×0.5 + poetry×1)"
        page.fill("#prompt", "The ship")
        page.fill("#max-tokens", "30")
        page.fill("#temperature", "0")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status-base').dataset.done === '1' && "
                               "document.getElementById('status-adapted').dataset.done === '1'", timeout=180_000)  # a shared 2-core machine can be slow
        base, adapted = page.text_content("#out-base"), page.text_content("#out-adapted")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

        # on request, each token's probability, for the base and the adapted pane side by side
        page.check("#show-probs")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status-base').dataset.done === '1' && "
                               "document.getElementById('status-adapted').dataset.done === '1'", timeout=180_000)  # a shared 2-core machine can be slow
        shown = {which: page.eval_on_selector_all(f"#out-{which} .tok", "els => els.map(e => [e.textContent, "
                                                  "parseFloat(e.dataset.p), e.title])") for which in ("base", "adapted")}
        assert page.text_content("#out-base") == base and page.text_content("#out-adapted") == adapted
        page.hover("#out-adapted .tok >> nth=2")
        page.screenshot(path=str(ARTIFACTS / "playground-probs.png"), full_page=True)
        browser.close()

        # what the page streamed is what the API answers for the same requests
        def api(adapters):
            r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60, json={
                "model": "lorakit/embedded", "prompt": "The ship", "max_tokens": 30, "temperature": 0, "seed": 0,
                "adapters": adapters})
            return "The ship" + r.json()["choices"][0]["text"]

        assert base == api({})
        assert adapted == api({"legal": 0.5, "poetry": 1.0})
        assert base != adapted

        # the probabilities shown are the API's, token by token, and differ between the panes
        def probabilities(adapters):
            r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60, json={
                "model": "lorakit/embedded", "prompt": "The ship", "max_tokens": 30, "temperature": 0, "seed": 0,
                "adapters": adapters, "logprobs": 1})
            return [math.exp(lp) for lp in r.json()["choices"][0]["logprobs"]["token_logprobs"]]

        for which, adapters in (("base", {}), ("adapted", {"legal": 0.5, "poetry": 1.0})):
            spans = shown[which]
            assert "".join(text for text, _, _ in spans) == (base if which == "base" else adapted)[len("The ship"):]
            expected = probabilities(adapters)
            assert len(spans) <= len(expected) and len(spans) >= len(expected) - 2  # a chunk can hold 2 tokens
            assert all(0 < p <= 1 and "p = " in title for _, p, title in spans)
            assert min(p for _, p, _ in spans) == pytest.approx(min(expected), abs=1e-3)
        assert [p for _, p, _ in shown["base"]] != [p for _, p, _ in shown["adapted"]]
    assert not errors
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
