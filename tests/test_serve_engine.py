"""The batching engine: a request's greedy output is the same alone, in a mixed batch, and by the plain path."""

from __future__ import annotations

import threading

import pytest
import torch

import lorakit
from lorakit import products
from lorakit.generate import Sampling, stream_tokens
from lorakit.packed import pack_for_inference
from lorakit.serve.engine import Engine, GenerationRequest, Overloaded, Stopped
from lorakit.serve.sampling import SamplingParams
from tests.conftest import VOCAB, build, randomize_adapters

RANKS = {"a": 2, "b": 6, "c": 3}  # adapters of different ranks share the batch
TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "v_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}
MIXES = [{"a": 1.0}, {}, {"b": 1.0}, {"c": 1.0}, {"a": 0.5, "b": 1.5}, {"b": 1.0}, {}, {"c": -1.0, "a": 1.0}]


def adapted(family: str):
    model = build(family)
    for name, r in RANKS.items():
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[family]), adapter=name)
    randomize_adapters(model, scale=0.3)
    return model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


class Collect:
    """emit() target: the tokens and the finish reason of one request."""

    def __init__(self):
        self.tokens, self.scores, self.finish, self.done = [], [], None, threading.Event()

    def __call__(self, token, finish, scores=None):
        if token is not None:
            self.tokens.append(token)
            self.scores.append(scores)
        else:
            self.finish = finish
            self.done.set()


def run(engine: Engine, ids, mix, max_tokens=12, prompt_logprobs=None, **kw) -> tuple[GenerationRequest, Collect]:
    out = Collect()
    sampling = SamplingParams(temperature=kw.pop("temperature", 0), **kw)
    request = GenerationRequest(ids, mix, max_tokens, out, sampling=sampling, prompt_logprobs=prompt_logprobs)
    engine.submit(request)
    return request, out


def reference(model, ids, mix, max_tokens=12) -> list[int]:
    """The plain single-sequence path (fused LoRA layer, set_adapters) as the oracle."""
    sampling = Sampling(max_new_tokens=max_tokens, greedy=True)
    if not mix:
        return list(stream_tokens(model, ids, sampling, eos_id=None, base=True))
    lorakit.set_adapters(model, mix)
    return list(stream_tokens(model, ids, sampling, eos_id=None))


@pytest.mark.parametrize("family, packed", [("llama", False), ("qwen2", False), ("gpt2", False), ("llama", True)])
def test_mixed_batch_equals_alone_and_the_plain_path(family, packed, monkeypatch):
    model = adapted(family)
    if packed:  # fp32 weights packed for oneDNN, as `lorakit serve` loads them on AMD CPUs with AVX-512
        if not products.available():
            pytest.skip("this torch has no oneDNN")
        monkeypatch.setenv(products.ENV, "1")
        monkeypatch.delenv("LORAKIT_PACKED_WEIGHTS", raising=False)
        assert pack_for_inference(model) > 0
    batch = list(zip(prompts(len(MIXES)), MIXES))
    expected = [reference(model, ids, mix) for ids, mix in batch]
    engine = Engine(model, eos_id=None, max_batch=8).start()
    try:
        alone = []
        for ids, mix in batch:
            _, out = run(engine, ids, mix)
            assert out.done.wait(30)
            alone.append(out.tokens)
        together = [run(engine, ids, mix)[1] for ids, mix in batch]
        for out in together:
            assert out.done.wait(30)
    finally:
        engine.stop()
    assert alone == expected
    assert [out.tokens for out in together] == expected
    assert all(out.finish == "length" for out in together)
    assert engine.stats.max_batch_seen > 1  # they really ran together
    assert len({tuple(t) for t in expected}) > 4  # and the adapters really differ


def test_requests_join_a_running_batch_at_step_boundaries():
    model = adapted("llama")
    batch = list(zip(prompts(6, seed=1), MIXES))
    expected = [reference(model, ids, mix, max_tokens=30) for ids, mix in batch]
    engine = Engine(model, eos_id=None, max_batch=8).start()
    outs = []
    try:
        for ids, mix in batch:  # each arrives while the earlier ones are mid-generation
            outs.append(run(engine, ids, mix, max_tokens=30)[1])
            while len(outs[-1].tokens) < 3 and not outs[-1].done.is_set():
                outs[-1].done.wait(0.001)
        for out in outs:
            assert out.done.wait(30)
    finally:
        engine.stop()
    assert [out.tokens for out in outs] == expected
    assert engine.stats.prefills == len(batch) and engine.stats.max_batch_seen > 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompts_arriving_together_are_prefilled_in_one_left_padded_forward(family):
    """Prompts of different lengths share one prefill; each output still equals the plain path's. One
    request finishes on its first token and one is cancelled before it starts: neither joins the batch."""
    model = adapted(family)
    batch = list(zip(prompts(6, seed=3), MIXES))
    assert len({len(ids) for ids, _ in batch}) > 2  # really different lengths, so really padded
    expected = [reference(model, ids, mix) for ids, mix in batch]
    engine = Engine(model, eos_id=None, max_batch=8).start()
    gate = threading.Event()
    try:
        engine.call(lambda _: gate.wait(30))  # holds the engine between steps while the requests queue up
        outs = [run(engine, ids, mix)[1] for ids, mix in batch]
        short = run(engine, batch[0][0], batch[0][1], max_tokens=1)[1]
        cancelled, never = run(engine, batch[1][0], batch[1][1])
        engine.cancel(cancelled)
        gate.set()
        for out in [*outs, short, never]:
            assert out.done.wait(30)
    finally:
        engine.stop()
    assert engine.stats.prefill_batches == 1 and engine.stats.prefills == len(batch) + 1
    assert [out.tokens for out in outs] == expected
    assert short.tokens == expected[0][:1] and short.finish == "length"
    assert never.tokens == [] and never.finish == "stop"
    assert engine.stats.max_batch_seen == len(batch)


def test_sampling_with_a_seed_is_the_same_alone_and_in_a_batch():
    model = adapted("llama")
    batch = list(zip(prompts(4, seed=2), MIXES))
    engine = Engine(model, eos_id=None).start()
    try:
        alone = []
        for ids, mix in batch:
            _, out = run(engine, ids, mix, temperature=0.9, top_p=0.9, seed=7)
            out.done.wait(30)
            alone.append(out.tokens)
        together = [run(engine, ids, mix, temperature=0.9, top_p=0.9, seed=7)[1] for ids, mix in batch]
        for out in together:
            out.done.wait(30)
    finally:
        engine.stop()
    assert [out.tokens for out in together] == alone


def test_finish_reasons_cancel_and_context_limit():
    model = adapted("llama")
    ids = prompts(1)[0]
    first = reference(model, ids, {"a": 1.0}, max_tokens=5)
    engine = Engine(model, eos_id=first[2]).start()  # the third token is "end of text"
    try:
        _, out = run(engine, ids, {"a": 1.0}, max_tokens=5)
        assert out.done.wait(30)
        assert (out.tokens, out.finish) == (first[:2], "stop")
        engine.eos_id = None
        long_ids = [5] * 60  # context is 64 positions: only 4 tokens fit
        _, out = run(engine, long_ids, {}, max_tokens=50)
        assert out.done.wait(30)
        assert out.finish == "length" and len(out.tokens) == 5  # the 5th is sampled at position 63, never fed
        request, out = run(engine, ids, {}, max_tokens=50)
        engine.cancel(request)
        assert out.done.wait(30)
        assert out.finish == "stop" and len(out.tokens) < 50
    finally:
        engine.stop()


def test_retired_adapter_leaves_after_its_requests_finish():
    model = adapted("llama")
    ids = prompts(1)[0]
    expected = reference(model, ids, {"b": 1.0}, max_tokens=40)
    engine = Engine(model, eos_id=None).start()
    try:
        _, out = run(engine, ids, {"b": 1.0}, max_tokens=40)
        while len(out.tokens) < 2:
            out.done.wait(0.001)
        engine.retire("b")
        assert out.done.wait(30)
        assert out.tokens == expected  # the request in flight finished on its adapter
        engine.call(lambda m: None).result(10)  # one more trip round the loop
        assert "b" not in lorakit.adapter_configs(model)
        assert all("b" not in layer.lora_A for _, layer in lorakit.lora_layers(model))
    finally:
        engine.stop()


def test_a_full_queue_is_refused_and_a_stopped_engine_fails_its_requests():
    model = adapted("llama")
    engine = Engine(model, eos_id=None, max_batch=1, max_waiting=2).start()
    hold = threading.Event()
    engine.call(lambda m: hold.wait(30))  # the engine thread is busy: nothing leaves the queue
    outs = [Collect() for _ in range(2)]
    for out in outs:
        engine.submit(GenerationRequest([1, 2], {}, 4, out))
    with pytest.raises(Overloaded):
        engine.submit(GenerationRequest([1, 2], {}, 4, Collect()))
    cancelled = engine.call(lambda m: None)
    assert cancelled.cancel()  # a caller that gives up: the job is skipped, the engine lives on
    engine._running = False  # stop without waiting: what is queued must still end
    hold.set()
    engine._thread.join(10)
    assert all(out.done.is_set() and out.finish == "unavailable" for out in outs)
    with pytest.raises(Stopped):
        engine.submit(GenerationRequest([1, 2], {}, 4, Collect()))


def test_a_bug_in_the_loop_ends_every_request_instead_of_hanging(monkeypatch):
    model = adapted("llama")
    engine = Engine(model, eos_id=None).start()
    out = Collect()
    monkeypatch.setattr(engine, "_retired", lambda: 1 / 0)  # something unexpected inside the loop itself
    engine.submit(GenerationRequest([1, 2], {}, 4, out))
    assert out.done.wait(10) and out.finish == "unavailable"
    assert not engine.alive() and isinstance(engine.died, ZeroDivisionError)  # `lorakit serve` then exits 1
    with pytest.raises(Stopped):
        engine.submit(GenerationRequest([1, 2], {}, 4, Collect()))
    engine.stop()  # returns: the loop has ended


def test_the_engine_runs_on_the_calling_thread_until_stopped_from_another():
    model = adapted("llama")
    engine = Engine(model, eos_id=None)
    outs, threads = [], []

    def started():  # requests are taken once the loop runs here, on this thread
        out = Collect()
        engine.submit(GenerationRequest([1, 2], {"a": 1.0}, 4, out))
        outs.append(out)
        stopper = threading.Thread(target=lambda: (out.done.wait(30), engine.stop()))
        stopper.start()
        threads.append(stopper)

    engine.run(started)  # returns once the other thread's stop() (which waits for the end) has ended the loop
    threads[0].join(30)
    assert not threads[0].is_alive() and outs[0].finish == "length" and len(outs[0].tokens) == 4
    assert engine.died is None and not engine.alive()


def test_models_with_sliding_window_caches_are_refused():
    from transformers import MistralConfig, MistralForCausalLM

    from lorakit.errors import UserError

    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8))
    with pytest.raises(UserError, match="full-attention models only"):
        Engine(model, eos_id=None)


def full_logprobs(model, ids: list[int], mix: dict[str, float]) -> torch.Tensor:
    """log_softmax of the model with `mix` applied (or none) over the whole sequence, in one plain forward."""
    with torch.no_grad():
        if mix:
            lorakit.set_adapters(model, mix)
            logits = model(torch.tensor([ids])).logits[0]
        else:
            with lorakit.disable_adapters(model):
                logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), -1)  # (L, V): row t predicts token t + 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logprobs_of_prompt_and_generated_tokens_equal_log_softmax_alone_and_in_a_mixed_batch(family):
    model = adapted(family)
    batch = list(zip(prompts(len(MIXES), seed=5), MIXES))
    engine = Engine(model, eos_id=None, max_batch=8).start()
    try:
        alone = []
        for ids, mix in batch:
            request, out = run(engine, ids, mix, max_tokens=6, prompt_logprobs=2, logprobs=3)
            assert out.done.wait(30)
            alone.append((request, out))
        together = [run(engine, ids, mix, max_tokens=6, prompt_logprobs=2, logprobs=3) for ids, mix in batch]
        for _, out in together:
            assert out.done.wait(30)
    finally:
        engine.stop()
    assert engine.stats.max_batch_seen > 1
    for (ids, mix), results in zip(batch, zip(alone, together)):
        for request, out in results:
            sequence = ids + out.tokens
            reference = full_logprobs(model, sequence, mix)
            assert request.prompt_scores[0] is None and len(request.prompt_scores) == len(ids)
            for t in range(1, len(ids)):
                score = request.prompt_scores[t]
                assert score.logprob == pytest.approx(reference[t - 1, ids[t]].item(), abs=1e-4)
                assert [i for i, _ in score.top] == reference[t - 1].topk(2).indices.tolist()
            for k, (token, score) in enumerate(zip(out.tokens, out.scores)):
                position = len(ids) - 1 + k
                assert score.logprob == pytest.approx(reference[position, token].item(), abs=1e-4)
                assert token == score.top[0][0]  # greedy: the chosen token is the likeliest
                assert [lp for _, lp in score.top] == pytest.approx(reference[position].topk(3).values.tolist(),
                                                                    abs=1e-4)


def test_max_tokens_zero_only_scores_the_prompt_and_does_not_join_the_batch():
    model = adapted("llama")
    ids = prompts(1, seed=6)[0]
    engine = Engine(model, eos_id=None).start()
    try:
        request, out = run(engine, ids, {"b": 1.0}, max_tokens=0, prompt_logprobs=0)
        assert out.done.wait(30)
    finally:
        engine.stop()
    assert out.tokens == [] and out.finish == "length" and engine.stats.steps == 0
    reference = full_logprobs(model, ids, {"b": 1.0})
    assert [s.logprob for s in request.prompt_scores[1:]] == pytest.approx(
        [reference[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4)


def test_one_row_with_broken_logits_ends_alone(monkeypatch):
    """A row whose logits are NaN (think: a broken adapter) ends with 'error'; its batch-mates go on."""
    model = adapted("llama")
    batch = list(zip(prompts(3, seed=7), [{"a": 1.0}, {"b": 1.0}, {}]))
    expected = [reference(model, ids, mix) for ids, mix in batch]
    import lorakit.serve.engine as engine_module

    real = engine_module.choose

    def poisoned(logits, rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.params.presence_penalty == 0.25:  # the marked request
                logits[i, 0] = float("nan")
        return real(logits, rows)

    monkeypatch.setattr(engine_module, "choose", poisoned)
    engine = Engine(model, eos_id=None).start()
    gate = threading.Event()
    try:
        engine.call(lambda _: gate.wait(30))  # all three start together
        outs = [run(engine, ids, mix)[1] for ids, mix in batch]
        bad = run(engine, batch[0][0], {"c": 1.0}, presence_penalty=0.25)[1]
        gate.set()
        for out in [*outs, bad]:
            assert out.done.wait(30)
    finally:
        engine.stop()
    assert bad.finish == "error" and bad.tokens == []
    assert [out.tokens for out in outs] == expected and engine.alive() is False


def test_a_request_whose_adapter_is_gone_ends_alone_and_the_others_go_on():
    """An adapter deleted behind the engine's back while a request for it waits: that request ends with
    an error when it would start; the running row and the prompts admitted with it give what they give
    alone (without the check, its rows would silently run on the base)."""
    model = adapted("llama")
    batch = list(zip(prompts(3, seed=11), [{"a": 1.0}, {"b": 1.0}, {}]))
    expected = [reference(model, ids, mix, max_tokens=20) for ids, mix in batch]
    engine = Engine(model, eos_id=None, max_batch=8).start()
    try:
        first = run(engine, *batch[0], max_tokens=20)[1]
        while len(first.tokens) < 3:  # running
            first.done.wait(0.001)
        gate = threading.Event()
        engine.call(lambda m: (lorakit.delete_adapter(m, "c"), gate.wait(30)))  # 'c' goes; the queue fills
        bad = run(engine, batch[1][0], {"c": 1.0}, max_tokens=20)[1]
        good = [run(engine, ids, mix, max_tokens=20)[1] for ids, mix in batch[1:]]
        gate.set()
        for out in [first, bad, *good]:
            assert out.done.wait(30)
    finally:
        engine.stop()
    assert bad.finish == "error" and bad.tokens == []
    assert [first.tokens, *(out.tokens for out in good)] == expected
    assert engine.alive() is False


@pytest.mark.parametrize("joined_step_fails", [False, True])
def test_prompts_join_the_running_rows_decode_step_in_one_forward(joined_step_fails, monkeypatch):
    """With rows running, new prompts are prefilled in the same forward as their decode step (the lean
    decoder): one forward, not a prefill and a step; the answers are those of the plain path. Where that
    forward fails halfway (after the first layer wrote its keys and values), the prompts are prefilled
    apart and the answers are the same."""
    from lorakit.serve.decoder import Decoder

    model = adapted("llama")
    batch = list(zip(sorted(prompts(4, seed=12), key=len, reverse=True), MIXES))  # the running row the widest
    expected = [reference(model, ids, mix, max_tokens=16) for ids, mix in batch]
    calls, projections = [], []
    real_run, real_project = Decoder.run, Decoder.project

    def counted(self, groups):
        calls.append(len(groups))
        return real_run(self, groups)

    def failing(self, module, x, parts):
        if joined_step_fails and len(parts) == 2:
            projections.append(module)
            if len(projections) == 5:  # layer 0's o_proj: its cache columns are written
                raise RuntimeError("a joined step that fails")
        return real_project(self, module, x, parts)

    monkeypatch.setattr(Decoder, "run", counted)
    monkeypatch.setattr(Decoder, "project", failing)
    engine = Engine(model, eos_id=None, max_batch=8).start()
    try:
        outs = [run(engine, *batch[0], max_tokens=16)[1]]
        while len(outs[0].tokens) < 3:
            outs[0].done.wait(0.001)
        gate = threading.Event()
        engine.call(lambda _: gate.wait(30))
        outs += [run(engine, ids, mix, max_tokens=16)[1] for ids, mix in batch[1:]]
        gate.set()
        for out in outs:
            assert out.done.wait(30)
    finally:
        engine.stop()
    assert [out.tokens for out in outs] == expected
    assert 2 in calls and engine.stats.prefill_batches == 2  # the first prompt alone, then the three joining


def test_a_failure_after_the_joined_forward_ends_the_new_requests_only():
    """A new request that breaks while its first token is delivered (here: its emit raises) ends; the row
    that was running goes on to the end with the tokens it gives alone."""
    model = adapted("llama")
    (ids, mix), (other, other_mix) = zip(prompts(2, seed=13), MIXES[:2])
    expected = reference(model, ids, mix, max_tokens=20)
    engine = Engine(model, eos_id=None, max_batch=8).start()

    def broken(token, finish, scores=None):
        if token is not None:
            raise RuntimeError("a client callback that breaks")

    try:
        first = run(engine, ids, mix, max_tokens=20)[1]
        while len(first.tokens) < 3:
            first.done.wait(0.001)
        gate = threading.Event()
        engine.call(lambda _: gate.wait(30))  # the new request arrives while the first is surely running
        engine.submit(GenerationRequest(other, other_mix, 20, broken, sampling=SamplingParams(temperature=0)))
        gate.set()
        assert first.done.wait(30)
    finally:
        engine.stop()
    assert first.tokens == expected and first.finish == "length"
    assert engine.stats.prefill_batches == 2 and isinstance(engine.last_error, RuntimeError)
    assert engine.died is None  # a failed step is not a dead engine


def test_an_adapter_on_the_output_head_loaded_while_serving_changes_the_answers_as_it_should():
    """Loading wraps the head in a new module after the engine started: the next forward must use it."""
    model = build("llama")  # no adapter yet: the head is a plain Linear
    ids = prompts(1, seed=9)[0]
    base = reference(model, ids, {})
    engine = Engine(model, eos_id=None, max_batch=8).start()
    try:
        assert run(engine, ids, {})[1].done.wait(30)

        def load(m):
            lorakit.inject(m, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]), adapter="h")
            randomize_adapters(m, scale=0.5)

        engine.call(load).result(30)
        _, out = run(engine, ids, {"h": 1.0})
        assert out.done.wait(30)
    finally:
        engine.stop()
    expected = reference(model, ids, {"h": 1.0})
    assert out.tokens == expected and expected != base


def test_an_adapter_served_before_and_deleted_by_a_job_is_checked_again():
    """The engine remembers which adapters passed its checks, but only until the next job: a request for
    an adapter that was served and then deleted by a job ends with an error, not on the base."""
    model = adapted("llama")
    ids = prompts(1, seed=13)[0]
    engine = Engine(model, eos_id=None, max_batch=8).start()
    try:
        served = run(engine, ids, {"c": 1.0}, max_tokens=4)[1]
        assert served.done.wait(30) and served.finish == "length"
        engine.call(lambda m: lorakit.delete_adapter(m, "c")).result(30)
        again = run(engine, ids, {"c": 1.0}, max_tokens=4)[1]
        assert again.done.wait(30)
    finally:
        engine.stop()
    assert again.finish == "error" and again.tokens == []
