"""How the server picks each row's next token, and the log-probabilities it reports.

For one row, with z (V,) the model's logits at the row's last position (OpenAI's definitions):

    z' = z - c · frequency_penalty - [c > 0] · presence_penalty + logit_bias
         c (V,): how often each token was generated so far in this row (the prompt does not count)
    greedy (temperature < GREEDY_BELOW):  argmax z'
    otherwise:  z' / T, keep the top_k, keep the smallest set of likeliest tokens whose mass reaches
                top_p (always at least one), sample with the row's own seeded generator

Reported log-probabilities are the model's own, log_softmax(z), before penalties, bias and
temperature (vLLM's default): what an evaluation harness scores, whatever the sampling settings.

Numerics: every step works on logits with their maximum subtracted (softmax, logsumexp), so no
temperature or top_p can overflow into NaN; temperatures too small to divide by are greedy. A row
whose logits are not finite (a broken adapter) gets no token and ends with an error; the other
rows of the batch are untouched.
"""

from __future__ import annotations

import collections
import secrets
from dataclasses import dataclass, field

import torch

from lorakit.generate import GREEDY_BELOW  # temperatures below it are greedy (the same rule as `lorakit generate`)
MAX_LOGPROBS = 20  # alternatives per token, OpenAI's and vLLM's limit
LOGPROB_FLOOR = -9999.0  # what a log-probability of -inf is reported as (JSON has no infinity), as vLLM does


@dataclass(frozen=True)
class SamplingParams:
    """One row's sampling settings, validated where the request enters (`lorakit.serve.protocol`)."""

    temperature: float = 1.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: a fresh random seed
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k likeliest

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def adjusts(self) -> bool:
        """Whether z' differs from z (penalties or a bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class TokenScores:
    """Log-probabilities at one position: the token there, and the k likeliest (best first)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RowSampler:
    """The sampling state of one row: its settings, its generator, the counts its penalties need."""

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = None if params.greedy else torch.Generator().manual_seed(seed)
        self.counts: collections.Counter[int] = collections.Counter()  # generated token -> times
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def adjust(self, z: torch.Tensor) -> None:
        """z (V,) -> z' in place: OpenAI's presence/frequency penalties and the logit bias."""
        p = self.params
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.counts), device=z.device)  # (m,)
            c = torch.tensor(list(self.counts.values()), dtype=z.dtype, device=z.device)  # (m,)
            z.index_add_(0, ids, -(c * p.frequency_penalty + p.presence_penalty))  # c > 0 for every listed id
        if p.logit_bias:
            if self._bias is None or self._bias[0].device != z.device:
                self._bias = (torch.tensor(list(p.logit_bias), device=z.device),
                              torch.tensor(list(p.logit_bias.values()), dtype=z.dtype, device=z.device))
            z.index_add_(0, *self._bias)

    def sample(self, z: torch.Tensor) -> int:
        """A token from the adjusted logits z' (V,) by temperature, top-k and top-p, in log space."""
        p = self.params
        z = z / p.temperature  # finite: T >= GREEDY_BELOW and |z| is far below float32's range / 1e5
        if p.top_k and p.top_k < z.numel():
            kth = torch.topk(z, p.top_k).values[-1]
            z = z.masked_fill(z < kth, float("-inf"))
        if p.top_p < 1:
            logp = torch.log_softmax(z, dim=-1)  # (V,): max subtracted inside, never NaN for finite z
            sorted_logp, order = logp.sort(descending=True)
            mass_before = sorted_logp.exp().cumsum(0) - sorted_logp.exp()  # (V,): mass of the likelier ones
            drop = mass_before >= p.top_p
            drop[0] = False  # the likeliest token always stays: a top_p of 1e-300 is 0 in float32 and would drop it
            z = z.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(z, dim=-1)  # (V,): at least one finite entry, so it sums to 1
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def accepted(self, token: int) -> None:
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts[token] += 1


def choose(logits: torch.Tensor, rows: list[RowSampler]) -> tuple[list[int | None], list[TokenScores | None]]:
    """Each row's next token (None where its logits are not finite) and, for rows that asked, its scores.

    logits: (n, V), row i's last position. Greedy rows share one argmax; the others sample one by one
    with their own generator, so a seeded row gets the same token alone or in any batch.
    """
    z = logits.float()  # (n, V)
    adjusted = z
    special = [i for i, row in enumerate(rows) if row.params.adjusts]
    if special:
        adjusted = z.clone()
        for i in special:
            rows[i].adjust(adjusted[i])
    argmax = adjusted.argmax(dim=-1)  # (n,)
    # argmax returns a NaN's position if there is one, and the row's maximum is finite only if no
    # logit is +inf or all are -inf: one gather checks every row (a logsumexp only where logprobs are asked)
    finite = torch.isfinite(z.gather(1, argmax[:, None])[:, 0] + adjusted.gather(1, argmax[:, None])[:, 0]).tolist()
    argmax = argmax.tolist()
    tokens: list[int | None] = []
    for i, row in enumerate(rows):
        if not finite[i]:
            log_failure("a row's logits are not finite (NaN or Inf: a broken adapter?); its request ends with an "
                        "error (500)")
            tokens.append(None)
        elif row.params.greedy:
            tokens.append(argmax[i])
        else:
            try:
                tokens.append(row.sample(adjusted[i]))
            except Exception as err:  # noqa: BLE001 - this row's sampling failed: it alone ends (500), logged
                log_failure("a row's sampling failed; its request ends with an error (500)", err)
                tokens.append(None)
    scores: list[TokenScores | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None and tokens[i] is not None]
    if wanted:
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        for i, s in zip(wanted, _scores(z, lse, wanted, [tokens[i] for i in wanted],
                                        max(rows[i].params.logprobs for i in wanted))):
            k = rows[i].params.logprobs
            scores[i] = TokenScores(s.logprob, s.top[:k])
    for row, token in zip(rows, tokens):
        if token is not None:
            row.accepted(token)
    return tokens, scores


def log_failure(what: str, err: BaseException | None = None) -> None:
    """The server-side line (and traceback) that every request ending in a 500 leaves in the log."""
    import sys
    import traceback

    print(f"lorakit serve: {what}", file=sys.stderr, flush=True)
    if err is not None:
        traceback.print_exception(err, file=sys.stderr)


def position_scores(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenScores]:
    """Scores of given tokens: logits (P, V) at P positions, targets (P,) the token that followed each."""
    if logits.shape[0] == 0:
        return []
    z = logits.float()  # (P, V)
    lse = torch.logsumexp(z, dim=-1)  # (P,)
    return _scores(z, lse, list(range(z.shape[0])), targets.tolist(), k)


def _scores(z: torch.Tensor, lse: torch.Tensor, rows: list[int], tokens: list[int], k: int) -> list[TokenScores]:
    """log_softmax(z)[row, token] and the k likeliest of each listed row, from z (n, V) and its logsumexp (n,)."""
    index = torch.tensor(rows, device=z.device)  # (m,)
    chosen = torch.tensor(tokens, device=z.device)  # (m,)
    logprob = (z[index, chosen] - lse[index]).clamp(min=LOGPROB_FLOOR).tolist()  # (m,)
    if not k:
        return [TokenScores(lp) for lp in logprob]
    top = torch.topk(z[index], min(k, z.shape[1]), dim=-1)  # (m, k)
    top_lp = (top.values - lse[index, None]).clamp(min=LOGPROB_FLOOR).tolist()
    top_ids = top.indices.tolist()
    return [TokenScores(lp, tuple(zip(ids, lps))) for lp, ids, lps in zip(logprob, top_ids, top_lp)]
