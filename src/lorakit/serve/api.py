"""The HTTP side of `lorakit serve`: OpenAI-compatible routes over a running `Engine`.

`create_app` wires the routes to an `Api` (one method per route), a guard that runs before every
route (loopback Host check, API key, JSON-only POSTs) and OpenAI-shaped error answers. `Registry`
maps the public adapter names to the keys they have inside the model. The server's configuration,
settings are in `lorakit.serve.config`, its startup and command line in `lorakit.serve.app`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.errors import UserError
from lorakit.files import OutsideRoot
from lorakit.serve.config import NAME_RULE, ServeConfig, valid_name
from lorakit.serve.engine import Engine, GenerationRequest, Overloaded, Stopped
from lorakit.serve.choices import Answer, Choice, Relay, TokenText, chunk_body, new_id
from lorakit.serve.protocol import ApiError, GenerationParams, TextStream, parse_request

PLAYGROUND = Path(__file__).with_name("playground.html")
# Prompts up to this size (`_text_size`) are tokenized on the event loop: about a millisecond at most here,
# where handing them to a thread costs more than tokenizing a few words; larger ones go to a thread.
INLINE_TOKENIZE_CHARS = 1024
PER_PIECE_CHARS = 64  # what `_text_size` counts for each prompt or message besides its text (template, call)


@dataclass
class ServedAdapter:
    """An adapter the server has loaded, under its public name (not `lorakit.algebra.Adapter`, the in-memory
    adapter of `combine`)."""

    name: str  # public name (the request's `model`)
    key: str  # name inside the model: unique for every load, so a name can be reloaded while the old one drains
    path: str
    rank: int
    created: int = field(default_factory=lambda: int(time.time()))


class Registry:
    """Public adapter names -> adapters in the model. Touched only on the event loop's thread."""

    def __init__(self, base_name: str):
        self.base_name = base_name
        self.adapters: dict[str, ServedAdapter] = {}
        self.pending: set[str] = set()  # names being loaded
        self._serial = 0
        self.created = int(time.time())

    def new_key(self, name: str) -> str:
        self._serial += 1
        return f"{name}#{self._serial}"

    def mix(self, params: GenerationParams) -> dict[str, float]:
        """The request's adapter mix as {internal key: scale}; 404 for a name that is not loaded."""
        if params.model != self.base_name and params.model not in self.adapters:
            raise ApiError(404, f"The model '{params.model}' does not exist; loaded: "
                                f"{', '.join([self.base_name, *self.adapters])}", param="model", code="model_not_found")
        if params.adapters is not None:
            mix = params.adapters
        else:
            mix = {} if params.model == self.base_name else {params.model: 1.0}
        for name in mix:
            if name not in self.adapters:
                raise ApiError(404, f"adapter '{name}' in 'adapters' is not loaded; loaded: "
                                    f"{', '.join(self.adapters) or 'none'}", param="adapters", code="model_not_found")
        return {self.adapters[n].key: s for n, s in mix.items() if s != 0}


def create_app(engine: Engine, tokenizer, registry: Registry, config: ServeConfig) -> FastAPI:
    """The FastAPI application over a running engine: routes wired to an `Api`, guard, error shapes."""
    api = Api(engine, tokenizer, registry, config)
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    for kind, handler in ((ApiError, _api_error), (HTTPException, _http_error),
                          (RequestValidationError, _validation_error), (Exception, _unexpected)):
        app.add_exception_handler(kind, handler)
    loopback = is_loopback(config.host)

    app.add_middleware(_Guard, config=config, loopback=loopback)

    app.get("/", response_class=HTMLResponse)(_playground)
    app.get("/favicon.ico", include_in_schema=False)(_favicon)
    app.get("/health")(api.health)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    app.post("/v1/load_lora_adapter")(api.load_lora_adapter)
    app.post("/v1/unload_lora_adapter")(api.unload_lora_adapter)
    return app


class Api:
    """What the routes do: requests in, OpenAI-shaped answers (or `ApiError`s) out, over one engine."""

    def __init__(self, engine: Engine, tokenizer, registry: Registry, config: ServeConfig):
        from lorakit.data import SIMPLE_CHAT_TEMPLATE

        self.engine, self.tokenizer, self.registry, self.config = engine, tokenizer, registry, config
        self.context = engine.context
        self.vocab = engine.model.get_input_embeddings().num_embeddings  # ids the model can embed
        self.template = bool(getattr(tokenizer, "chat_template", None))
        self.names = TokenText(tokenizer)
        self.relay: Relay | None = None  # engine events to the event loop, made on the first request
        # Without a chat template of its own the base sees "### Role:" headers; it must not write the next turn.
        self.chat_stops = [] if self.template else ["\n" + SIMPLE_CHAT_TEMPLATE.split("{")[0]]

    # -- routes ---------------------------------------------------------------------------------

    async def health(self):
        if not self.engine.alive():
            return JSONResponse({"status": "down", **self.engine.load()}, status_code=503)
        return {"status": "ok", **self.engine.load()}

    async def models(self):
        registry, context = self.registry, self.context
        base = {"id": registry.base_name, "object": "model", "created": registry.created, "owned_by": "lorakit",
                "root": registry.base_name, "parent": None, "max_model_len": context}
        data = [base] + [{"id": a.name, "object": "model", "created": a.created, "owned_by": "lorakit",
                          "root": a.path, "parent": registry.base_name, "max_model_len": context, "rank": a.rank}
                         for a in registry.adapters.values()]
        return {"object": "list", "data": data}

    async def completions(self, request: Request):
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self.generate(request, chat=True)

    async def load_lora_adapter(self, request: Request):
        from lorakit.io import install_adapter, read_adapter

        body = await self.read_json(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        registry = self.registry
        if not valid_name(name):
            raise ApiError(400, NAME_RULE.format(name=name), param="lora_name")
        root, where = self.adapter_path(path)
        if name == registry.base_name or name in registry.adapters or name in registry.pending:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded; unload it first",
                           param="lora_name")
        cap = self.config.max_adapters
        if len(registry.adapters) + len(registry.pending) >= cap:
            raise ApiError(400, f"this server holds at most {cap} adapters (--max-adapters); unload one first",
                           param="lora_name", code="too_many_adapters")
        registry.pending.add(name)
        try:
            try:  # file reading and checks happen off the engine thread: generation goes on meanwhile
                # `inside`: the files actually opened must lie in --adapter-dir (a link swapped in after
                # adapter_path's check is caught here, on the open file)
                lora_config, tensors = await asyncio.to_thread(read_adapter, where, root)
                servable(lora_config, where)
            except OutsideRoot:
                raise ApiError(403, "'lora_path' must resolve inside the server's --adapter-dir",
                               param="lora_path") from None
            except UserError as err:
                raise ApiError(400, str(err).replace(str(root), "<adapter-dir>"), param="lora_path") from None
            key = registry.new_key(name)
            try:  # the model itself changes between two decode steps, on the engine thread
                await asyncio.wrap_future(self.engine.call(
                    lambda model: install_adapter(model, lora_config, tensors, key, source=where)))
            except UserError as err:
                raise ApiError(400, str(err).replace(str(root), "<adapter-dir>"), param="lora_path") from None
            except Stopped:
                raise ApiError(503, "server is shutting down", code="unavailable") from None
            except asyncio.CancelledError:  # the caller went away mid-install: take it out again if it got in
                self.engine.retire(key)
                raise
            registry.adapters[name] = ServedAdapter(name, key, where.name, lora_config.r)
        finally:
            registry.pending.discard(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: Request):
        body = await self.read_json(request)
        name, registry = body.get("lora_name"), self.registry
        if not isinstance(name, str) or name not in registry.adapters:
            raise ApiError(404, f"The lora adapter '{name}' is not loaded; loaded: "
                                f"{', '.join(registry.adapters) or 'none'}", param="lora_name", code="model_not_found")
        adapter = registry.adapters.pop(name)  # new requests no longer reach it ...
        self.engine.retire(adapter.key)  # ... and it leaves the model once the ones in flight are done
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, request: Request, chat: bool):
        params = parse_request(await self.read_json(request), chat)
        mix = self.registry.mix(params)
        self.check_logit_bias(params)
        # off the event loop where long: a prompt of a megabyte takes a while to tokenize, and /health must not
        # wait; a short one is quicker to tokenize than to hand to a thread
        if _text_size(params) <= INLINE_TOKENIZE_CHARS:
            prompts = self.prompt_ids(params, chat)
        else:
            prompts = await asyncio.to_thread(self.prompt_ids, params, chat)
        budgets = [self.budget(params, len(ids)) for ids in prompts]
        rows = len(prompts) * params.best_of
        if rows > self.engine.max_waiting:
            raise ApiError(400, f"this request needs {rows} rows ({len(prompts)} prompts x {params.best_of}); the "
                                f"server queues at most {self.engine.max_waiting} (--max-waiting)", param="n")
        names = self.names if not params.tokens_as_ids else TokenText(self.tokenizer, as_ids=True)
        loop = asyncio.get_running_loop()
        if self.relay is None or self.relay.loop is not loop:
            self.relay = Relay(loop)
        answer = Answer(params.best_of, params.n, chat, names, params.logprobs, self.relay)
        stops = params.stop + (self.chat_stops if chat else [])
        scoring = params.logprobs if params.echo else None  # the prompt's own log-probabilities
        for prompt, ids, budget in zip(params.prompts or [None], prompts, budgets):
            echo = (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=True)) \
                if params.echo else ""
            for j in range(params.best_of):
                job = GenerationRequest(ids, mix, budget, answer.emitter(), prompt_logprobs=scoring,
                                        sampling=params.sampling(j, scored=params.best_of > params.n))
                answer.add_row(job, Choice(len(answer.jobs), TextStream(self.tokenizer, stops, context=ids), echo),
                               ids)
        try:
            self.engine.submit(*answer.jobs)
        except Overloaded as err:
            raise ApiError(429, f"server is busy ({err}); retry shortly", code="server_busy") from None
        except Stopped:
            raise ApiError(503, "server is shutting down", code="unavailable") from None
        rid, model = new_id(chat), params.model
        events = answer.events(self.engine.cancel)
        if not params.stream:
            count = 0
            async for _ in events:
                count += 1
                if count % 8 == 0 and await request.is_disconnected():
                    await events.aclose()  # nobody is reading: free the rows now
                    return PlainTextResponse("", status_code=499)
            return JSONResponse(answer.body(rid, model))  # as it is: FastAPI would walk it (jsonable_encoder)

        async def stream():
            try:
                if chat:
                    for i in range(len(answer.choices)):
                        yield _sse(chunk_body(rid, model, i, "", None, chat, first=True))
                async for choice, text, tokens, finish in events:
                    logprobs = answer.logprobs_of(tokens) if tokens else None
                    if text or finish or logprobs:
                        yield _sse(chunk_body(rid, model, choice.index, text, finish, chat, logprobs))
                if params.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": int(time.time()), "model": model, "choices": [], "usage": answer.usage()})
            except ApiError as err:  # the status line is sent already: report in the stream, as vLLM does
                yield _sse(err.body())
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- checks ---------------------------------------------------------------------------------

    async def read_json(self, request: Request) -> dict:
        """The body as a JSON object, at most `max_body_bytes` long."""
        cap = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"request body is {declared} bytes; this server takes at most {cap}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise ApiError(413, f"request body is over {cap} bytes, the most this server takes")
        try:
            data = json.loads(body)
            _check_text(data)
        except (ValueError, RecursionError) as err:  # bad JSON, huge numbers, nesting, lone surrogates
            raise ApiError(400, f"request body is not valid JSON ({str(err)[:200]})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def check_logit_bias(self, params: GenerationParams) -> None:
        bad = [t for t in params.logit_bias if t >= self.vocab]
        if bad:
            raise ApiError(400, f"'logit_bias' token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})",
                           param="logit_bias")

    def prompt_ids(self, params: GenerationParams, chat: bool) -> list[list[int]]:
        """Each prompt's token ids (one for a chat)."""
        if chat:
            return [self.chat_ids(params.messages)]
        return [self.completion_ids(prompt) for prompt in params.prompts]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        from lorakit.data import render_chat_prompt

        try:
            text = render_chat_prompt(messages, self.tokenizer)
        except Exception as err:  # the tokenizer's template may refuse a conversation (e.g. role order)
            raise ApiError(400, f"the model's chat template refused these messages: {err}", param="messages") from None
        # a tokenizer's own template writes its start token into the text (as training saw it)
        return self.tokenizer(text, add_special_tokens=not self.template).input_ids

    def completion_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"'prompt' token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})",
                               param="prompt")
            return list(prompt)
        ids = self.tokenizer(prompt).input_ids
        if not ids:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        return ids

    def budget(self, params: GenerationParams, n_prompt: int) -> int:
        """max_tokens checked against the context and the server's cap (400 naming the limit)."""
        context, cap = self.context, self.config.max_tokens
        room = context - n_prompt if context else cap
        if context and room < (0 if params.max_tokens == 0 else 1):
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt alone is "
                                f"{n_prompt} tokens. Shorten the prompt.", param="prompt", code="context_length_exceeded")
        if params.max_tokens is None:
            return min(room, cap)
        if params.max_tokens > cap:
            raise ApiError(400, f"'max_tokens' is {params.max_tokens}; this server generates at most "
                                f"{cap} tokens per request", param="max_tokens")
        if context and n_prompt + params.max_tokens > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the prompt, {params.max_tokens} "
                                "in the completion). Reduce the prompt or 'max_tokens'.",
                           param="max_tokens", code="context_length_exceeded")
        return params.max_tokens

    def adapter_path(self, path) -> tuple[Path, Path]:
        """(--adapter-dir, the adapter directory) for a load request's `lora_path`, confined to the former."""
        from lorakit.config import CONFIG_NAME
        from lorakit.io import WEIGHTS_NAME

        if not isinstance(path, str) or not path:
            raise ApiError(400, "'lora_path' is required: an adapter directory inside the server's --adapter-dir",
                           param="lora_path")
        if self.config.adapter_dir is None:
            raise ApiError(403, "loading adapters is off: start the server with --adapter-dir DIR", param="lora_path")
        root = Path(self.config.adapter_dir).resolve()
        try:  # follows symlinks: a link inside that points out is refused too, for the files as well
            where = (root / path).resolve()
            inside = [where, *((where / f).resolve() for f in (CONFIG_NAME, WEIGHTS_NAME))]
        except (ValueError, OSError, RuntimeError):  # NUL bytes; symlink loops (RuntimeError before Python 3.13)
            raise ApiError(400, "'lora_path' is not a usable path (a NUL byte or a symbolic link loop)",
                           param="lora_path") from None
        if not all(p.is_relative_to(root) for p in inside):
            raise ApiError(403, "'lora_path' must resolve inside the server's --adapter-dir", param="lora_path")
        return root, where


# -- what runs before and around every route ------------------------------------------------------


def _text_size(params: GenerationParams) -> int:
    """About how much work tokenizing is: characters of the prompts or messages (token ids count one each),
    and `PER_PIECE_CHARS` for each prompt or message (a chat template writes text around every message,
    so 30,000 empty messages are a lot of work)."""
    if params.messages:
        return sum(len(str(m.get("content") or "")) + PER_PIECE_CHARS for m in params.messages)
    return sum(len(p) + PER_PIECE_CHARS for p in params.prompts)


class _Guard:
    """`_refusal` before every HTTP request, as a plain ASGI middleware: Starlette's `BaseHTTPMiddleware`
    (what `@app.middleware("http")` makes) runs each request through a task group and memory streams and
    wraps `receive`, which made every `Request.is_disconnected` poll costly too."""

    def __init__(self, app, config: ServeConfig, loopback: bool):
        self.app, self.config, self.loopback = app, config, loopback

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refused = _refusal(Request(scope), self.config, self.loopback)
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(request: Request, config: ServeConfig, loopback: bool) -> JSONResponse | None:
    """Host check (loopback only), API key on /v1/*, JSON bodies only: the answer if refused, else None."""
    if loopback and request.headers.get("host", "").rsplit(":", 1)[0].strip("[]") not in LOOPBACK_NAMES:
        # a web page that re-points its own domain at 127.0.0.1 (DNS rebinding) gets no answer
        err = ApiError(403, "this server answers only requests addressed to localhost / 127.0.0.1", code="bad_host")
        return JSONResponse(err.body(), status_code=403)
    path = request.scope["path"]  # the routed path itself, not one rebuilt from headers
    if config.api_key and path.startswith("/v1/"):
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            err = ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401)
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # also what stops a foreign web page from posting here unasked
            err = ApiError(415, f"send the body as JSON with 'Content-Type: application/json' (got {kind!r})",
                           code="unsupported_media_type")
            return JSONResponse(err.body(), status_code=415)
    return None


async def _api_error(request, err: ApiError):
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(request, err: HTTPException):
    return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)


async def _validation_error(request, err):
    return JSONResponse(ApiError(400, str(err)).body(), status_code=400)


async def _unexpected(request, err):  # a bug, not the client's fault: still OpenAI's shape, and logged
    import traceback

    traceback.print_exception(err)
    return JSONResponse(ApiError(500, "internal server error; see the server's log").body(), status_code=500)


async def _playground():
    return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))


async def _favicon():
    return PlainTextResponse("", status_code=204)


def servable(config, source) -> None:
    """Refuse adapters whose weights are not all low-rank: per-request routing covers LoRA weights only."""
    if config.modules_to_save or config.trainable_token_indices or config.bias != "none":
        what = "modules_to_save" if config.modules_to_save else "trainable_token_indices" \
            if config.trainable_token_indices else f"bias={config.bias!r}"
        raise UserError(f"{source}: the adapter trains {what}, which would change the shared base for every request; "
                        "serve it merged instead (lorakit merge) or retrain without it")


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _check_text(value, depth: int = 0) -> None:
    """Strings must be real text: a lone surrogate ("\\ud800") cannot be tokenized or echoed back."""
    if depth > 64:
        raise ValueError("nested more than 64 levels deep")
    if isinstance(value, str):
        value.encode("utf-8")  # UnicodeEncodeError is a ValueError
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, depth + 1)
            _check_text(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, depth + 1)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
