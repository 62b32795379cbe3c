"""OpenAI's answers: engine tokens in, choices out (text, stop strings, log-probabilities, echo, best_of).

One HTTP request may run several rows (n choices of each of several prompts, or best_of candidates);
each row is a `Choice`. A choice turns its tokens into text through a `TextStream` (which holds back
incomplete UTF-8 and what may begin a stop string) and keeps every token's log-probabilities until
its text is released, so a streamed chunk carries exactly the tokens whose text it shows:

    token  offset  (where its text starts in the choice's text; with echo the prompt comes first)
    released when the text up to its end has been handed out; at a stop string, the tokens that
    start before the cut are kept and the rest dropped.

Log-probabilities come in two shapes: the completions' legacy one (`tokens`, `token_logprobs`,
`top_logprobs` as {token text: logprob} including the chosen token, `text_offset`) and chat's
(`content`: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lorakit.serve.protocol import ApiError, TextStream
from lorakit.serve.sampling import TokenScores


@dataclass
class Scored:
    """One token of a choice: its id, where its text starts in the choice's text, its log-probabilities."""

    token: int
    offset: int
    scores: TokenScores | None
    end: int | None = None  # where its text ends; None while the character it starts is incomplete


class TokenText:
    """How a token is shown in log-probabilities: its own text and its bytes, cached per id.

    A token that is part of a character (byte-level BPE splits multi-byte UTF-8) has no text of its
    own; like OpenAI it is shown as "bytes:\\xe2\\x80", with its real bytes in chat's `bytes`."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids  # as_ids: vLLM's "token_id:123" names
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"

    def bytes(self, token: int) -> list[int]:
        if token not in self._bytes:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if self._byte_level and isinstance(piece, str) and all(c in _UNICODE_TO_BYTE for c in piece):
                raw = [_UNICODE_TO_BYTE[c] for c in piece]
            elif isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = [int(piece[3:5], 16)]  # SentencePiece's byte fallback
            else:
                raw = list(self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8"))
            self._bytes[token] = raw
        return self._bytes[token]

    def text(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        if token not in self._text:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            if "\ufffd" in text:
                raw = bytes(self.bytes(token))
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._text[token] = text
        return self._text[token]


def _byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE's table (GPT-2's): printable bytes stand for themselves, the rest are shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


class Choice:
    """One row of an answer: its text (prefix + generated, stop strings cut) and its scored tokens."""

    def __init__(self, index: int, stream: TextStream, prefix: str = "", prefix_tokens: list[Scored] = ()):
        self.index, self.stream, self.prefix = index, stream, prefix
        self.tokens: list[Scored] = list(prefix_tokens)  # released
        self.pending: list[Scored] = []  # generated, text not handed out yet
        self.parts: list[str] = [prefix]
        self.finish: str | None = None
        self.generated = 0
        self.logprob_sum = 0.0  # of the generated tokens: best_of ranks choices by its mean

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, token: int, scores: TokenScores | None) -> tuple[str, list[Scored]]:
        """A generated token: (the text now safe to show, the tokens that text completes)."""
        self.generated += 1
        if scores is not None:
            self.logprob_sum += scores.logprob
        before = len(self.stream.text)
        scored = Scored(token, len(self.prefix) + before, scores)
        self.pending.append(scored)
        delta = self.stream.add(token)
        if not self.stream.incomplete:
            end = len(self.prefix) + len(self.stream.text)
            for p in self.pending:
                if p.end is None:
                    p.end = end
        if self.stream.stopped:
            return self._release(delta, cut=True)
        return self._release(delta)

    def close(self, finish: str) -> tuple[str, list[Scored]]:
        """The end: whatever was held back, and every token left."""
        self.finish = finish
        delta = self.stream.flush()
        self.parts.append(delta)
        released, self.pending = self.pending, []
        if self.stream.stopped:  # a stop string cut the text: its tokens were settled then
            released = []
        self.tokens += released
        return delta, released

    def _release(self, delta: str, cut: bool = False) -> tuple[str, list[Scored]]:
        self.parts.append(delta)
        shown = len(self.prefix) + self.stream.sent
        if cut:  # tokens that start inside the kept text stay, the rest go
            released = [p for p in self.pending if p.offset < shown]
            self.pending = []
        else:
            released = [p for p in self.pending if p.end is not None and p.end <= shown]
            self.pending = self.pending[len(released):]
        self.tokens += released
        return delta, released

    def mean_logprob(self) -> float:
        return self.logprob_sum / self.generated if self.generated else 0.0


# -- shapes ---------------------------------------------------------------------------------------


def legacy_logprobs(tokens: list[Scored], names: TokenText) -> dict:
    """Completions' shape; each top_logprobs entry holds the k likeliest and the chosen token (OpenAI's
    "up to logprobs + 1 elements"), None for the prompt's first token, which has no prediction."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(names.text(t.token))
        out["text_offset"].append(t.offset)
        if t.scores is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(t.scores.logprob)
        top: dict[str, float] = {}
        for token, logprob in (*t.scores.top, (t.token, t.scores.logprob)):
            top.setdefault(names.text(token), logprob)  # two ids with one text: the likelier one's number
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokens: list[Scored], names: TokenText) -> dict:
    """Chat's shape: one entry per token with its text, bytes and its k likeliest alternatives."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": names.text(token), "logprob": logprob, "bytes": names.bytes(token)}

    return {"content": [{**entry(t.token, t.scores.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.scores.top]}
                        for t in tokens if t.scores is not None], "refusal": None}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice_body(choice: Choice, index: int, chat: bool, logprobs: dict | None) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": choice.text}, "logprobs": logprobs,
                "finish_reason": choice.finish}
    return {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish}


def completion_body(rid: str, model: str, choices: list[dict], chat: bool, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use}


def chunk_body(rid: str, model: str, index: int, text: str | None, finish: str | None, chat: bool,
               logprobs: dict | None = None, first: bool = False) -> dict:
    """One server-sent event of a stream ('chat.completion.chunk' or 'text_completion')."""
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


# -- one request's rows -----------------------------------------------------------------------------


class Relay:
    """Engine events to one event loop, with one wake-up of the loop per batch of events, not per event.

    The engine thread emits a token for every running row at every step. Handing each to the loop with
    `call_soon_threadsafe` writes to the loop's self-pipe each time (3% of the server's time at 8
    clients); here the first event of a batch schedules the drain and the rest join it. Events are
    delivered in the order they were put, so each row's order is kept.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, tuple]] = []

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        """Deliver `item` into `queue` on the loop (from any thread); dropped if the loop is gone."""
        with self._lock:
            if self.loop.is_closed():  # shut down, maybe with a drain it never ran: nobody is listening
                self._items.clear()
                return
            self._items.append((queue, item))
            if len(self._items) > 1:  # a drain is already scheduled and will take this one too
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            with self._lock:
                self._items.clear()

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class Answer:
    """The rows of one HTTP request and their choices: engine events in (on any thread), choices out.

    Rows are ordered prompt by prompt, `per_prompt` rows each (n, or best_of); choice indices follow
    OpenAI: prompt p's j-th choice is p·n + j.
    """

    def __init__(self, jobs_per_prompt: int, n: int, chat: bool, names: TokenText, logprobs: int | None,
                 relay: Relay):
        self.per_prompt, self.n, self.chat, self.names, self.logprobs = jobs_per_prompt, n, chat, names, logprobs
        self.relay = relay
        self.jobs: list = []  # GenerationRequest per row
        self.choices: list[Choice] = []
        self.prompt_tokens: list[list[int]] = []  # per row: its prompt's ids (echo scores them)
        self._queue: asyncio.Queue = asyncio.Queue()

    def emitter(self) -> Callable:
        """The `emit` of the next row: hands engine events to the event loop."""
        k, relay, queue = len(self.jobs), self.relay, self._queue

        def emit(token, finish, scores):  # called on the engine thread
            relay.put(queue, (k, token, finish, scores))

        return emit

    def add_row(self, job, choice: Choice, prompt_ids: list[int]) -> None:
        self.jobs.append(job)
        self.choices.append(choice)
        self.prompt_tokens.append(prompt_ids)

    def generated(self) -> int:
        return sum(job.generated for job in self.jobs)

    async def events(self, cancel: Callable) -> AsyncIterator[tuple[Choice, str, list[Scored], str | None]]:
        """(choice, new text, the tokens it completes, finish reason) as rows produce them; `cancel(job)`
        stops a row (a stop string matched, or the consumer went away: every row is cancelled at the end)."""
        open_rows, started = len(self.jobs), [False] * len(self.jobs)
        try:
            while open_rows:
                k, token, finish, scores = await self._queue.get()
                choice, job = self.choices[k], self.jobs[k]
                if choice.finish is not None:  # stopped by a stop string; the engine's own end comes later
                    continue
                if not started[k]:
                    started[k] = True
                    if choice.prefix:  # echo: the prompt, scored by the engine before this first event
                        choice.tokens = self._prompt_tokens(self.prompt_tokens[k], job.prompt_scores, choice.prefix)
                        yield choice, choice.prefix, choice.tokens, None
                if token is not None:
                    delta, tokens = choice.add(token, scores)
                    if choice.stream.stopped:
                        cancel(job)
                        choice.finish = "stop"
                        open_rows -= 1
                        yield choice, delta, tokens, "stop"
                    elif delta or tokens:
                        yield choice, delta, tokens, None
                    continue
                if finish == "unavailable":
                    raise ApiError(503, "server is shutting down", code="unavailable")
                if finish == "error":
                    raise ApiError(500, "generation failed inside the server; see its log", code="internal_error")
                open_rows -= 1
                delta, tokens = choice.close(finish)
                yield choice, delta, tokens, finish
        finally:
            for job in self.jobs:
                cancel(job)  # a no-op after a normal end; frees the rows when the client disconnects

    def _prompt_tokens(self, ids: list[int], scores: list | None, text: str) -> list[Scored]:
        """The echoed prompt's tokens, each at the offset where the decoded prefix before it ends."""
        tokenizer = self.names.tokenizer
        offsets = [len(t) for t in tokenizer.batch_decode([ids[:i] for i in range(len(ids))], skip_special_tokens=True)]
        scores = scores or [None] * len(ids)
        return [Scored(t, min(o, len(text)), s, end=None) for t, o, s in zip(ids, offsets, scores)]

    def logprobs_of(self, tokens: list[Scored]) -> dict | None:
        if self.logprobs is None:
            return None
        return chat_logprobs(tokens, self.names) if self.chat else legacy_logprobs(tokens, self.names)

    def best(self) -> list[Choice]:
        """The choices to return: all of them, or per prompt the n of best_of with the highest mean
        log-probability per token (OpenAI's definition of "best"), renumbered p·n + j."""
        if self.per_prompt == self.n:
            return self.choices
        out = []
        for p in range(0, len(self.choices), self.per_prompt):
            group = self.choices[p:p + self.per_prompt]
            out += sorted(group, key=lambda c: -c.mean_logprob())[:self.n]
        return out

    def body(self, rid: str, model: str) -> dict:
        choices = [choice_body(c, i, self.chat, self.logprobs_of(c.tokens)) for i, c in enumerate(self.best())]
        return completion_body(rid, model, choices, self.chat, self.usage())

    def usage(self) -> dict:
        return usage(sum(map(len, self.prompt_tokens[::self.per_prompt])), self.generated())
