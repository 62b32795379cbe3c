"""`lorakit demo` on the embedded base: trains, and meets the targets it prints."""

from __future__ import annotations

import pytest

from lorakit.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_runs_and_meets_its_targets(tmp_path, capsys):
    report = run_demo(DemoConfig(out=tmp_path / "demo", steps=40, dtype="fp32"))  # numeric targets: pinned
    assert report["disabled_equals_base"]
    assert report["disabled_general_perplexity"] == report["base_general_perplexity"]
    assert report["adapted_domain_perplexity"] < report["base_domain_perplexity"]
