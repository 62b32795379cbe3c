"""lm-evaluation-harness as a real client: a multiple-choice task the tests ship (tests/data/lm_eval),
scored through `lorakit serve` (its `local-completions` model: echo + logprobs) and by its `hf` model
loading the same adapter with PEFT. Same accuracy, every item's log-likelihood within 1e-3 (fp32).
And an adapter mix sent to the server equals the same mix set in-process with `lorakit.set_adapters`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.base import load_base
from lorakit.serve.config import ServeConfig
from tests.serving import live_server, make_adapters

TASKS = Path(__file__).parent / "data" / "lm_eval"
BASE_DIR = Path(lorakit.__file__).parent / "assets" / "base"
MIX = {"legal": 0.5, "poetry": 1.0}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"), {"legal": 8, "poetry": 4})


@pytest.fixture(scope="module")
def evaluate(monkeypatch_module):
    """simple_evaluate on the shipped task, offline, from the task's directory (its data path is relative)."""
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.chdir(TASKS)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS))

    def run(model, model_args=None, **kwargs) -> tuple[float, list[list[float]]]:
        out = simple_evaluate(model=model, model_args=model_args, tasks=["lorakit_mc"], task_manager=manager,
                              log_samples=True, **kwargs)
        samples = sorted(out["samples"]["lorakit_mc"], key=lambda s: s["doc_id"])
        return out["results"]["lorakit_mc"]["acc,none"], [[ll for ll, _ in s["filtered_resps"]] for s in samples]

    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_served_adapter_scores_like_transformers_with_peft(adapters, evaluate):
    config = ServeConfig(adapters={k: str(v) for k, v in adapters.items()}, dtype="fp32")
    with live_server(config) as (url, engine, _):
        served_acc, served = evaluate("local-completions", {
            "model": "legal", "base_url": url + "/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(BASE_DIR), "num_concurrent": 2, "max_retries": 1, "batch_size": 4,
            "add_bos_token": True})  # as the hf model does for a tokenizer that adds <s> (this one)
        assert engine.stats.prefill_batches < engine.stats.prefills  # the prompts of a request share a forward
    peft_acc, reference = evaluate("hf", {"pretrained": str(BASE_DIR), "peft": str(adapters["legal"]),
                                          "dtype": "float32", "device": "cpu"}, batch_size=8)
    assert served_acc == peft_acc
    assert len(served) == len(reference) == 10 and all(len(row) == 4 for row in served)
    for mine, theirs in zip(served, reference):
        assert mine == pytest.approx(theirs, abs=1e-3)
    assert len({round(x, 3) for row in reference for x in row}) > 30  # real, different numbers


def test_an_adapter_mix_through_the_server_equals_set_adapters_in_process(adapters, evaluate):
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.models.huggingface import HFLM

    class MixCompletions(LocalCompletionsAPI):
        """lm-eval's own client, with lorakit's one extension field in every request body."""

        def _create_payload(self, *args, **kwargs) -> dict:
            return {**super()._create_payload(*args, **kwargs), "adapters": MIX}

    config = ServeConfig(adapters={k: str(v) for k, v in adapters.items()}, dtype="fp32")
    with live_server(config) as (url, _, _):
        client = MixCompletions(model="lorakit/embedded", base_url=url + "/v1/completions",
                                tokenizer_backend="huggingface", tokenizer=str(BASE_DIR), max_retries=1, batch_size=4,
                                add_bos_token=True)
        served_acc, served = evaluate(client)

    model, tokenizer = load_base(None, dtype=torch.float32)
    for name, path in adapters.items():
        lorakit.load_adapter(model, path, adapter=name)
    lorakit.set_adapters(model, MIX)
    local_acc, local = evaluate(HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=8))
    assert served_acc == local_acc
    for mine, theirs in zip(served, local):
        assert mine == pytest.approx(theirs, abs=1e-3)
    # and the mix is really a mix: it differs from either adapter alone
    lorakit.set_adapters(model, {"legal": 1.0})
    _, legal_only = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8))
    assert max(abs(a - b) for r1, r2 in zip(local, legal_only) for a, b in zip(r1, r2)) > 1e-2
