"""The server's sampling maths against direct implementations: OpenAI's penalty formula, logit bias,
reported log-probabilities, greedy thresholds, seeds; and hostile numbers that must not make NaN."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from lorakit.serve.sampling import GREEDY_BELOW, RowSampler, SamplingParams, choose, position_scores

V = 50


def logits(n: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def openai_penalized(z: list[float], generated: list[int], presence: float, frequency: float,
                     bias: dict[int, float]) -> list[float]:
    """OpenAI's documented formula, element by element:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence (+ logit_bias[j])."""
    c = collections.Counter(generated)
    return [mu - c[j] * frequency - float(c[j] > 0) * presence + bias.get(j, 0.0) for j, mu in enumerate(z)]


@pytest.mark.parametrize("presence, frequency, bias", [
    (0.0, 0.7, {}), (1.5, 0.0, {}), (-2.0, 2.0, {}), (0.5, -0.3, {3: 100.0, 7: -100.0}), (0.0, 0.0, {4: 2.5}),
])
def test_penalties_and_bias_equal_openais_formula(presence, frequency, bias):
    row = RowSampler(SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency,
                                    logit_bias=bias))
    history = [3, 3, 9, 1, 3, 9]
    for token in history:
        row.accepted(token)
    z = logits(1)[0]
    adjusted = z.clone()
    row.adjust(adjusted)
    expected = openai_penalized(z.tolist(), history, presence, frequency, bias)
    assert adjusted.tolist() == pytest.approx(expected, abs=1e-5)


def test_greedy_with_penalties_follows_the_adjusted_argmax_and_counts_only_generated_tokens():
    z = torch.zeros(1, V)
    z[0, 5], z[0, 6] = 2.0, 1.5  # 5 wins until it has been generated once with presence 1
    row = RowSampler(SamplingParams(temperature=0, presence_penalty=1.0))
    first, _ = choose(z, [row])
    second, _ = choose(z, [row])
    assert (first, second) == ([5], [6])
    assert row.counts == {5: 1, 6: 1}


def test_reported_logprobs_are_the_models_own_log_softmax():
    z = logits(3, seed=1)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0.7, seed=1, logprobs=0,
                                                                          frequency_penalty=1.0, logit_bias={2: 50}),
              SamplingParams(temperature=0)]
    tokens, scores = choose(z, [RowSampler(p) for p in params])
    reference = torch.log_softmax(z.double(), -1)
    assert scores[0].logprob == pytest.approx(reference[0, tokens[0]].item(), abs=1e-5)
    assert [t for t, _ in scores[0].top] == reference[0].topk(5).indices.tolist()
    assert [lp for _, lp in scores[0].top] == pytest.approx(reference[0].topk(5).values.tolist(), abs=1e-5)
    # bias and penalties change the choice (token 2 is forced) but not the reported log-probability
    assert tokens[1] == 2 and scores[1].top == ()
    assert scores[1].logprob == pytest.approx(reference[1, 2].item(), abs=1e-5)
    assert scores[2] is None  # did not ask


def test_prompt_scores_are_the_log_softmax_at_each_position():
    z = logits(4, seed=2)
    targets = torch.tensor([1, 2, 3, 4])
    scores = position_scores(z, targets, 2)
    reference = torch.log_softmax(z.double(), -1)
    assert [s.logprob for s in scores] == pytest.approx([reference[i, t].item() for i, t in enumerate(targets)],
                                                        abs=1e-5)
    assert all(len(s.top) == 2 for s in scores)
    assert position_scores(z[:0], targets[:0], 2) == []


@pytest.mark.parametrize("temperature", [0.0, GREEDY_BELOW / 10, 1e-30])
def test_tiny_temperatures_are_greedy(temperature):
    z = logits(2, seed=3, scale=30.0)
    tokens, _ = choose(z, [RowSampler(SamplingParams(temperature=temperature)) for _ in range(2)])
    assert tokens == z.argmax(-1).tolist()


@pytest.mark.parametrize("temperature, top_p, top_k", [
    (GREEDY_BELOW, 1.0, 0), (1e-4, 1e-30, 0), (2.0, 1e-9, 0), (2.0, 1.0, 1), (0.3, 0.5, 3), (2.0, 1.0, 10**9),
])
def test_extreme_sampling_settings_never_make_nan_and_respect_top_p(temperature, top_p, top_k):
    z = logits(4, seed=4, scale=80.0)  # logits far apart: probabilities underflow to 0
    rows = [RowSampler(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=i)) for i in range(4)]
    tokens, _ = choose(z, rows)
    assert all(t is not None and 0 <= t < V for t in tokens)
    if top_p < 1e-6 or top_k == 1:
        assert tokens == z.argmax(-1).tolist()


def test_a_row_with_broken_logits_gets_no_token_and_the_others_are_untouched():
    z = logits(3, seed=5)
    broken = z.clone()
    broken[1, 7] = float("nan")
    broken[2, 3] = float("inf")
    params = SamplingParams(temperature=0.8, seed=11, logprobs=2)
    alone, _ = choose(z[:1], [RowSampler(params)])
    tokens, scores = choose(broken, [RowSampler(params) for _ in range(3)])
    assert tokens == [alone[0], None, None] and scores[1] is None and scores[2] is None
    assert math.isfinite(scores[0].logprob)


def test_a_seeded_row_samples_the_same_alone_and_among_others():
    z = logits(5, seed=6, scale=1.0)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = [choose(z[2:3], [RowSampler(params)])[0][0] for _ in range(3)]
    batched = [choose(z, [RowSampler(SamplingParams(temperature=1.0, seed=i)) if i != 2 else RowSampler(params)
                          for i in range(5)])[0][2] for _ in range(3)]
    assert alone == batched
    draws = {choose(z[2:3], [RowSampler(SamplingParams(temperature=1.0, seed=s))])[0][0] for s in range(40)}
    assert len(draws) > 3  # the seed really matters
