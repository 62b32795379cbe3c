"""The inference engine: one frozen base, many adapters, one batched forward per step.

A single thread owns the model. It loops:

    1. run queued jobs (install or delete an adapter): between steps, so no forward sees a half-made model
    2. admit waiting requests (continuous batching): prefill the new prompts together in one forward
       (left-padded to the longest), sample each one's first token, and join their KV cache to the
       running batch's
    3. one decode step for every running row: row i applies its own adapter mix (the gathered per-row
       low-rank product of `lorakit.routing`, S-LoRA/Punica style), then each row samples its next token
    4. drop finished or cancelled rows from the batch and its cache

With the lean forward and rows running, 2 and 3 are one forward: the new prompts' tokens ride in the
decode step as more rows of its products (`Decoder.run`), and join the batch after it.

For Llama-shaped models (Llama, Mistral, Qwen2) prefill and decode run `lorakit.serve.decoder`'s lean
forward, which writes into the spare columns of the batch's `lorakit.serve.batch_cache.BatchCache`;
other models run their own forward. The batch's KV cache is left-padded: rows that joined later have
zeros in front, masked out by the attention mask, and each row's position ids count only its own
tokens. A request therefore computes the same function alone or in a batch; only the floating-point
summation order of the matmuls can differ, far below what changes a greedy choice in practice (tests
check the outputs are equal).

Requests talk to the engine through `submit` (from any thread) and a callback `emit(token, finish, scores)`
that the engine thread calls for every token and once with a finish reason ("stop", "length", "error",
"unavailable"); `scores` are the token's log-probabilities when the request asked for them. A request
that asked for its prompt's log-probabilities finds them in `prompt_scores` before its first emit.
How tokens are chosen and scored is `lorakit.serve.sampling`'s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.adapters import check_row_adapters, delete_adapter, routed
from lorakit.base import autocast
from lorakit.errors import UserError
from lorakit.routing import AdapterStacks, RowRouting
from lorakit.serve.batch_cache import BatchCache, left_pad
from lorakit.serve.decoder import Decoder, Rows
from lorakit.serve.sampling import RowSampler, SamplingParams, TokenScores, choose, log_failure, position_scores

Emit = Callable[[int | None, str | None, TokenScores | None], None]


class Overloaded(RuntimeError):
    """The waiting queue is full: the caller should answer 429 and the client retry later."""


class Stopped(RuntimeError):
    """The engine is shutting down."""


@dataclass(eq=False)
class GenerationRequest:
    """One generation: prompt token ids, an adapter mix ({internal adapter name: scale}; {} = the base).

    `max_tokens` 0 only scores the prompt (with `prompt_logprobs` set): no token is generated.
    """

    prompt_ids: list[int]
    adapters: dict[str, float]
    max_tokens: int
    emit: Emit
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's log-probability and the k likeliest
    prompt_scores: list[TokenScores | None] | None = None  # set by the engine: None for the first token
    cancelled: bool = False
    generated: int = 0
    finished: bool = False


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    sampler: RowSampler
    last: int  # the token to feed at the next step
    length: int  # real tokens in the cache so far (= the next position id)
    done: str | None = None  # finish reason once finished


@dataclass
class _Prompts:
    """New requests, prefilled together as one group of left-padded rows."""

    requests: list[GenerationRequest]
    rows: Rows


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0  # prompts prefilled
    prefill_batches: int = 0  # forwards that prefilled them (several new prompts share one)
    tokens: int = 0
    max_batch_seen: int = 0
    row_steps: int = 0  # sum over decode steps of the batch size

    def mean_batch(self) -> float:
        return self.row_steps / self.steps if self.steps else 0.0


@dataclass
class Engine:
    """Continuous batching over `model` (a causal LM with LoRA adapters injected by name)."""

    model: nn.Module
    eos_id: int | set[int] | None  # the end-of-text token, or a set of them (chat models often end turns too)
    max_batch: int = 16
    max_waiting: int = 64
    dtype: torch.dtype = torch.float32
    stats: EngineStats = field(default_factory=EngineStats)

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self._lock = threading.Condition()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._jobs: collections.deque[tuple[Callable, concurrent.futures.Future]] = collections.deque()
        self._rows: list[_Row] = []
        self._cache: BatchCache | None = None  # the running batch's keys and values, (rows, heads, L, head_dim)
        self._mask: torch.Tensor | None = None  # (rows, L): 1 where the cache holds a real token
        self._users: collections.Counter[str] = collections.Counter()  # adapter -> requests holding it
        self._retiring: set[str] = set()
        self._stacks = AdapterStacks()  # each LoRA layer's adapters stacked for the gathered product
        self._routing: tuple[tuple[_Row, ...], RowRouting] | None = None  # the running rows' routing
        # The model's LoRA layers and the adapters `check_row_adapters` passed, until the next job: a
        # step then routes its rows without walking the model (0.3 ms a step on the 6-layer embedded base)
        self._checked: tuple[list, set[str]] | None = None
        self._thread: threading.Thread | None = None
        # Only the last position's logits are needed: skip the (P, vocab) projection where the model allows.
        accepts = inspect.signature(self.model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._decoder: Decoder | None = None
        self._decoder = self._check_decoder()  # forwards without the model's own, where its wiring allows
        self.last_error: BaseException | None = None  # the last failure of a step (the engine went on) or of the engine
        self.died: BaseException | None = None  # what stopped the engine itself (a bug), if anything did
        self._ended = threading.Event()  # set when the loop has ended
        self._check_cache_kind()

    def _check_decoder(self) -> Decoder | None:
        """`Decoder.of` the model as it is now (a job may have wrapped or unwrapped layers, or hooked one),
        keeping the product layout measured so far."""
        decoder = Decoder.of(self.model)
        if decoder is not None and self._decoder is not None:
            decoder.transposed = self._decoder.transposed
        return decoder

    def _check_cache_kind(self) -> None:
        """The batch cache is joined and trimmed per layer as plain (B, H, L, D) keys and values."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        config = getattr(self.model, "config", None)
        layers = DynamicCache(config=config).layers if config is not None else []
        odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
        if odd:
            raise UserError(f"this model's attention cache ({', '.join(sorted(odd))}) is not a plain key/value "
                            "cache; lorakit serve supports full-attention models only")
        self._running = False

    # -- any thread ----------------------------------------------------------------------------

    def start(self) -> Engine:
        """Run the engine on a thread of its own (see `run` for why `lorakit serve` does not)."""
        self._running = True
        self._ended.clear()
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def run(self, started: Callable[[], object] = lambda: None) -> None:
        """Run the engine on the calling thread until `stop` (or an exception, such as Ctrl-C's, which
        ends every request and propagates); `started()` is called once requests are taken.

        `lorakit serve` runs it on the process's main thread: OpenMP's workers, through which torch
        parallelizes a product, wait spinning between a main thread's products, but asleep between
        another thread's, and waking them cost each oneDNN product of a decode step more than the
        product itself (an 8 x 256 by 704 x 256 product: 22-55 us on the main thread, 82-215 us on
        another, on a 2-core Zen 5 guest)."""
        self._running = True
        self._ended.clear()
        self._thread = threading.current_thread()
        try:
            started()
        except BaseException:
            self._running = False
            self._ended.set()
            raise
        self._loop()

    def stop(self, wait: bool = True) -> None:
        """End the loop (requests still running end with an error); `wait`: until it has ended, unless
        called on the engine's own thread."""
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._ended.wait()

    def submit(self, *requests: GenerationRequest) -> None:
        """Queue requests, all or none (the rows of one HTTP request); raises Overloaded when they would
        take the queue past `max_waiting`."""
        with self._lock:
            if not self.alive():
                raise Stopped("the engine is not running")
            if len(self._waiting) + len(requests) > self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting")
            for request in requests:
                self._users.update(request.adapters.keys())
                self._waiting.append(request)
            self._lock.notify_all()

    def cancel(self, request: GenerationRequest) -> None:
        """Stop generating for `request` (a stop string matched, or the client went away)."""
        request.cancelled = True  # read by the engine thread at the next step boundary

    def call(self, job: Callable[[nn.Module], object]) -> concurrent.futures.Future:
        """Run `job(model)` on the engine thread between two steps; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self.alive():
                raise Stopped("the engine is not running")
            self._jobs.append((job, future))
            self._lock.notify_all()
        return future

    def retire(self, adapter: str) -> None:
        """Delete `adapter` from the model (on the engine thread) once no request uses it any more.

        Requests already running or waiting on it finish normally; the caller stops routing new ones to it.
        """
        with self._lock:
            self._retiring.add(adapter)
            self._lock.notify_all()

    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    def load(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._rows), "waiting": len(self._waiting)}

    # -- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as err:  # a bug: say so in the server's log, then end every request below
            import traceback

            self.last_error = self.died = err
            print("lorakit serve: the inference engine stopped on an internal error:", file=sys.stderr)
            traceback.print_exception(err)
        finally:  # normal stop, or a bug: either way nobody may wait forever
            self._running = False
            try:
                self._fail_all("the server is shutting down")
            finally:
                self._ended.set()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while self._running and not (self._waiting or self._jobs or self._rows or self._retired()):
                    self._lock.wait()
                if not self._running:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
                retired = self._retired()
                self._retiring -= set(retired)
                room = self.max_batch - len(self._rows)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            for adapter in retired:  # before the jobs: a job queued after a retirement sees it done
                self._run_job(lambda model, a=adapter: delete_adapter(model, a), concurrent.futures.Future())
            for job, future in jobs:
                self._run_job(job, future)
            if admitted and self._rows and self._decoder is not None:  # one forward: new prompts join the step
                self._guard(self._step, admitted, running=True)
                continue
            if admitted:
                self._guard(self._admit, admitted, running=False)
            if self._rows:
                self._guard(self._step, [], running=True)

    def _retired(self) -> list[str]:
        return [a for a in self._retiring if self._users[a] == 0]

    def _run_job(self, job: Callable, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():  # the caller gave up before it ran: skip it
            return
        try:
            result = job(self.model)
        except Exception as err:  # handed to the caller, who reports it
            future.set_exception(err)
        else:
            future.set_result(result)
        finally:  # adapters may have come or gone: restack them (and free the old stacks) on next use
            self._stacks, self._routing, self._checked = AdapterStacks(), None, None
            self._decoder = self._check_decoder()

    def _guard(self, step: Callable[[list[GenerationRequest]], None], new: list[GenerationRequest],
               running: bool) -> None:
        """`step(new)`; an unexpected failure ends the requests involved (`new`, and the running rows' if
        `running`) with finish reason 'error', not the engine."""
        try:
            step(new)
        except Exception as err:  # noqa: BLE001 - the engine must outlive one bad batch
            involved = new + ([row.request for row in self._rows] if running else [])
            log_failure(f"a step failed; its {len(involved)} request(s) end with an error (500)", err)
            for request in involved:
                self._finish(request, "error")
            if running:
                self._rows, self._cache, self._mask = [], None, None
            self.last_error = err

    def _running_routing(self) -> RowRouting:
        """The running rows' adapter mixes: one routing until rows join or leave, so that decode steps
        reuse its gather indices (and every routing the engine makes shares its stacked weights)."""
        rows = tuple(self._rows)
        if self._routing is None or self._routing[0] != rows:
            self._routing = rows, RowRouting([row.request.adapters for row in rows], stacks=self._stacks)
        return self._routing[1]

    def _check(self, routing: RowRouting) -> list:
        """`check_row_adapters(self.model, routing)`, remembered until the next job (only jobs change the model)."""
        names = set(routing.adapters())
        if self._checked is None or not names <= self._checked[1]:
            layers = check_row_adapters(self.model, routing)  # a UserError says what is wrong
            self._checked = layers, (set() if self._checked is None else self._checked[1]) | names
        return self._checked[0]

    def _routed(self, routing: RowRouting):
        """`per_row_adapters(self.model, routing)`, with the checks remembered (`_check`)."""
        return routed(self._check(routing), routing)

    def _forward(self, routing: RowRouting, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: BatchCache | None, every_position: bool = False) -> tuple[torch.Tensor, BatchCache]:
        """Logits (n, T, V), or the last position's (n, 1, V), for `ids` (n, T) after `cache` (None: a
        prefill), and the cache with their columns: the lean forward where the model allows, else its own."""
        from transformers import DynamicCache

        with self._routed(routing), autocast(self.device, self.dtype):
            if self._decoder is not None:
                return self._decoder.forward(ids, positions, mask, cache, every_position)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             cache=DynamicCache() if cache is None else cache.dynamic(),
                             **({} if every_position else self._last_logits_only))
        return out.logits, BatchCache.of(out.cache)

    @torch.inference_mode()  # not no_grad: no version counters or view tracking either (jobs stay outside)
    def _admit(self, requests: list[GenerationRequest]) -> None:
        """Prefill the new prompts in one forward (left-padded), sample each first token, join the batch."""
        prompts = self._prompts(requests)
        if prompts is None:
            return
        group = prompts.rows
        logits, cache = self._forward(group.routing, group.ids, group.positions, group.mask, None,
                                      every_position=group.every_position)  # (n, P or 1, V)
        self._begin(prompts, logits, cache)

    def _prompts(self, requests: list[GenerationRequest]) -> _Prompts | None:
        """The new prompts that were not cancelled while waiting, as one left-padded group of rows (None: none)."""
        for request in requests:
            if request.cancelled:
                self._finish(request, "stop")
        requests = [r for r in requests if not r.cancelled]
        if not requests:
            return None
        routing = RowRouting([r.adapters for r in requests], stacks=self._stacks)
        try:
            self._check(routing)
        except UserError:  # a request's adapter is gone: that request ends, not the others prefilled with it
            requests = [r for r in requests if self._servable(r)]
            if not requests:
                return None
            routing = RowRouting([r.adapters for r in requests], stacks=self._stacks)
        width = max(len(r.prompt_ids) for r in requests)
        # Padding in front, masked out; its id is any valid one, and its position ids are clamped to 0.
        ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests],
                           device=self.device)  # (n, P)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=self.device)  # (n, P)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts its own tokens from 0
        scoring = any(r.prompt_logprobs is not None for r in requests)
        return _Prompts(requests, Rows(ids, positions, mask, routing=routing, every_position=scoring))

    def _servable(self, request: GenerationRequest) -> bool:
        """Whether the model can apply `request`'s adapters; if not, the request ends with an error."""
        try:
            check_row_adapters(self.model, RowRouting([request.adapters]))
        except UserError as err:
            log_failure(f"a request cannot start: {err}")
            self._finish(request, "error")
            return False
        return True

    def _begin(self, prompts: _Prompts, logits: torch.Tensor, cache: BatchCache) -> None:
        """After the prompts' forward (`logits` (n, P or 1, V)): score the prompts that asked for it, sample
        each first token, join the batch."""
        requests, ids = prompts.requests, prompts.rows.ids
        width = ids.shape[1]
        self.stats.prefills += len(requests)
        self.stats.prefill_batches += 1
        rows = [_Row(r, RowSampler(r.sampling), last=-1, length=len(r.prompt_ids)) for r in requests]
        for i, request in enumerate(requests):
            if request.prompt_logprobs is not None:
                n = len(request.prompt_ids)  # its tokens are the last n columns; column c predicts column c + 1
                request.prompt_scores = [None, *position_scores(logits[i, width - n:-1], ids[i, width - n + 1:],
                                                                request.prompt_logprobs)]
        scoring_only = [row for row in rows if row.request.max_tokens == 0]
        for row in scoring_only:
            row.done = "length"
            self._finish(row.request, "length")
        sampling = [(i, row) for i, row in enumerate(rows) if not row.done]
        if sampling:
            last = logits[[i for i, _ in sampling], -1]  # (m, V)
            tokens, scores = choose(last, [row.sampler for _, row in sampling])
            for (_, row), token, score in zip(sampling, tokens, scores):
                self._accept(row, token, score)
        self._join(rows, cache, prompts.rows.mask)

    def _join(self, rows: list[_Row], cache: BatchCache, mask: torch.Tensor) -> None:
        """Append prefilled rows (their cache and (n, P) mask) to the batch, leaving out the finished ones:
        left-pad whichever side is shorter, concatenate rows."""
        keep = [i for i, row in enumerate(rows) if not row.done]
        if not keep:
            return
        if len(keep) < len(rows):
            cache, mask = cache.select(keep), mask[keep]
            rows = [rows[i] for i in keep]
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, rows
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            self._cache.join(cache)
            self._mask = torch.cat([left_pad(self._mask, width), left_pad(mask, width)])  # (rows, L)
            self._rows += rows
        self._trim()

    @torch.inference_mode()
    def _step(self, new: list[GenerationRequest]) -> None:
        """One token for every running row, in one forward pass; the prompts of `new` (lean decoder only)
        are prefilled in the same pass, and their rows join the batch after it."""
        rows = self._rows
        ids = torch.tensor([[row.last] for row in rows], device=self.device)  # (n, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)  # (n, L+1)
        positions = torch.tensor([[row.length] for row in rows], device=self.device)  # (n, 1)
        prompts = self._prompts(new) if new else None
        if prompts is None:
            logits, self._cache = self._forward(self._running_routing(), ids, positions, self._mask, self._cache)
        else:
            step = Rows(ids, positions, self._mask, self._cache, self._running_routing())
            try:
                with self._routed(step.routing), autocast(self.device, self.dtype):
                    (logits, self._cache), prompted = self._decoder.run([step, prompts.rows])
            except Exception as err:  # noqa: BLE001 - nothing is changed yet (the cache gained only spare room)
                # The prompts' failure must not end the running rows: prefill them apart, then step, as
                # without joining (a prompt that fails there ends with those prefilled with it).
                log_failure("a step with joining prompts failed; prefilling them apart", err)
                self._mask = self._mask[:, :-1]
                self._guard(self._admit, prompts.requests, running=False)
                return self._step([])
        self.stats.steps += 1
        self.stats.row_steps += len(rows)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(rows))
        tokens, scores = choose(logits[:, -1], [row.sampler for row in rows])  # logits (n, 1, V)
        for row, token, score in zip(rows, tokens, scores):
            row.length += 1
            self._accept(row, token, score)
        self._drop_finished()
        if prompts is not None:  # a failure from here on ends the new requests, not the running rows
            self._guard(lambda _: self._begin(prompts, *prompted), prompts.requests, running=False)

    def _accept(self, row: _Row, token: int | None, scores: TokenScores | None) -> None:
        """Deliver one sampled token, or finish the row (end of text, length, cancelled, broken logits)."""
        request = row.request
        if request.cancelled:
            row.done = "stop"
        elif token is None:  # this row's logits were not finite: it alone ends
            row.done = "error"
        elif token in _as_set(self.eos_id):
            row.done = "stop"
        else:
            request.generated += 1
            self.stats.tokens += 1
            request.emit(token, None, scores)
            row.last = token
            if request.generated >= request.max_tokens:
                row.done = "length"
            elif self.context is not None and row.length >= self.context:  # no position left to feed it at
                row.done = "length"
        if row.done:
            self._finish(request, row.done)

    def _finish(self, request: GenerationRequest, reason: str) -> None:
        if request.finished:
            return
        request.finished = True
        with self._lock:
            self._users.subtract(request.adapters.keys())
        request.emit(None, reason, None)

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.done and not row.request.cancelled]
        for row in self._rows:
            if not row.done and row.request.cancelled:
                self._finish(row.request, "stop")
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        order = self._cache.compact(keep)  # the last rows move into the holes
        self._rows = [self._rows[i] for i in order]
        self._mask = self._mask[order]
        self._trim()

    def _trim(self) -> None:
        """Drop the cache columns that are padding in every row."""
        start = int((self._mask.sum(0) > 0).long().argmax())  # the first column some row owns
        if start:
            self._cache.trim(start)
            self._mask = self._mask[:, start:]

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
        for row in self._rows:
            self._finish(row.request, "unavailable")
        for request in waiting:
            self._finish(request, "unavailable")
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(Stopped(reason))
        self._rows, self._cache, self._mask = [], None, None


def _as_set(ids: int | set[int] | None) -> set[int] | frozenset[int]:
    return frozenset() if ids is None else {ids} if isinstance(ids, int) else ids
