"""Perplexity of the base, the adapted model and the adapter at scales (`lorakit eval`)."""

from __future__ import annotations

import json

import pytest
from commands import trained_adapter as adapter  # noqa: F401 (a fixture)

from lorakit.cli import main


def test_eval_json_reports_base_adapted_and_scales(tiny_base, adapter, tmp_path, capsys):
    data = tmp_path / "held.txt"
    data.write_text("the crew sailed north at dawn and sang. " * 10)
    code = main(["eval", "--base", str(tiny_base), "--adapter", str(adapter), "--data", str(data),
                 "--scales", "0,1,2", "--seq-len", "32", "--dtype", "fp32", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapted"]["perplexity"] < result["base"]["perplexity"]
    by_scale = {row["scale"]: row["perplexity"] for row in result["scales"]}
    assert by_scale[0] == result["base"]["perplexity"]
    assert by_scale[1] == pytest.approx(result["adapted"]["perplexity"], rel=1e-6)
