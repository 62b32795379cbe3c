"""`lorakit demo` on the embedded base: trains, and meets the targets it prints."""

from __future__ import annotations

import pytest

from lorakit.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_runs_and_meets_its_targets(tmp_path, capsys):
    report = run_demo(DemoConfig(out=tmp_path / "demo", steps=20, dtype="fp32"))  # numeric targets: pinned
    assert report["disabled_equals_base"]
    assert report["disabled_general_perplexity"] == report["base_general_perplexity"]
    assert report["adapted_domain_perplexity"] < report["base_domain_perplexity"]
    # one line per recipe: the adapter, the full fine-tune on the same steps, a rank-1 adapter, both on 30% of the steps
    lora, full, rank1, lora_part, full_part = report["recipes"]
    assert rank1["trainable_params"] < lora["trainable_params"] and lora_part["trainable_params"] == lora["trainable_params"]
    assert lora_part["domain"] > lora["domain"] and full_part["domain"] > full["domain"]  # less data, less learned
    assert lora["trainable_params"] < full["trainable_params"] and lora["bytes"] < full["bytes"]
    assert full["gain_vs_full"] == 1 and lora["domain"] == report["adapted_domain_perplexity"]
    assert full["domain"] < report["base_domain_perplexity"]
    # the same adapter dialled to 0.5 lands between the base and the adapter at 1 (it learned something: it moved)
    assert report["adapted_domain_perplexity"] < report["scale_0.5_domain_perplexity"] < report["base_domain_perplexity"]
    assert report["scale_2_domain_perplexity"] != report["adapted_domain_perplexity"]
    printed = capsys.readouterr().out
    assert "adapter at scale 0.5" in printed and "scale 0.5 keeps" in printed
    assert printed.count("of the full fine-tune's gain") == 5 and (tmp_path / "demo" / "full" / "config.json").is_file()
