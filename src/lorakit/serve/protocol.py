"""OpenAI's request fields, checked, and its response and error shapes.

Requests are plain JSON objects checked field by field, so every mistake becomes a 400 that names the
field (OpenAI's error shape: {"error": {"message", "type", "param", "code"}}). Unknown fields that
change nothing (user, metadata, ...) are ignored; fields that would change the output but are not
supported here (suffix, tools, JSON mode, vLLM's min_p, ...) are refused rather than silently dropped.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from lorakit.serve.sampling import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                             429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500
                                                          else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class GenerationParams:
    """What a completion or chat request asks for, validated."""

    model: str
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: texts or token ids, one row each
    messages: list[dict] = field(default_factory=list)  # chat
    max_tokens: int | None = None  # None: as many as the context and the server's cap allow; 0: score only
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extra field; 0 (or -1): off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices per prompt
    best_of: int = 1  # completions: rows sampled per prompt, of which the n likeliest are returned
    echo: bool = False  # completions: the prompt comes back in front of the text (and its logprobs)
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k likeliest alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:123"
    adapters: dict[str, float] | None = None  # lorakit's extension: a mix {adapter: scale}

    @property
    def prompt(self) -> str | list[int]:
        """The first prompt (most requests have one)."""
        return self.prompts[0]

    def sampling(self, choice: int, scored: bool) -> SamplingParams:
        """Settings of the row for choice `choice` of a prompt; `scored`: report chosen-token logprobs
        even if the client did not ask (best_of ranks by them)."""
        logprobs = self.logprobs if self.logprobs is not None else (0 if scored else None)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=choice_seed(self.seed, choice), presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias, logprobs=logprobs)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice `choice`: choice 0 uses the request's own seed (so n=1 and the first of n agree);
    the others get seeds derived from it, different from one another and from seed + 1, seed + 2 ..."""
    if seed is None or choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# Fields that would change the answer and that this server does not implement, with the values that
# change nothing (and so are accepted: clients often send the defaults explicitly).
_UNSUPPORTED = {"suffix": [""], "tools": [[]], "functions": [[]], "response_format": [{"type": "text"}],
                # vLLM's extra sampling fields
                "min_p": [0], "repetition_penalty": [1], "length_penalty": [1], "stop_token_ids": [[]],
                "ignore_eos": [False], "min_tokens": [0], "use_beam_search": [False], "prompt_logprobs": [0]}
# Completions-only fields, refused in a chat request unless they are no-ops.
_NOT_IN_CHAT = {"echo": [False], "best_of": [1]}
MAX_N = 128  # OpenAI's limit on n
MAX_BEST_OF = 20  # OpenAI's limit on best_of
MAX_LOGIT_BIAS = 300  # entries in logit_bias (OpenAI's limit)
MAX_PROMPTS = 256  # prompts in one completions request


def parse_request(body: dict, chat: bool) -> GenerationParams:
    """Check a /v1/completions (chat=False) or /v1/chat/completions body; raise ApiError(400) naming the field."""
    for name, harmless in {**_UNSUPPORTED, **(_NOT_IN_CHAT if chat else {})}.items():
        if body.get(name) is not None and body[name] not in harmless:
            where = "by this server" if name not in _NOT_IN_CHAT else "in chat completions (use /v1/completions)"
            raise ApiError(400, f"'{name}' = {body[name]!r} is not supported {where}; leave it out", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the base model's name or an adapter's (see GET /v1/models)",
                       param="model")
    params = GenerationParams(model=model)
    if chat:
        params.messages = _messages(body.get("messages"))
        tokens = _given(body, "max_completion_tokens", body.get("max_tokens"))
        params.logprobs = _chat_logprobs(body)
    else:
        params.prompts = _prompts(body.get("prompt"))
        tokens = body.get("max_tokens", 16)  # OpenAI's default for completions
        params.echo = _flag(body, "echo")
        if body.get("logprobs") is not None and body["logprobs"] is not False:  # false: what some clients send for none
            params.logprobs = _number(body["logprobs"], "logprobs", int, low=0, high=MAX_LOGPROBS)
    if tokens is not None:
        params.max_tokens = _number(tokens, "max_tokens", int, low=0)
        if params.max_tokens == 0 and not params.echo:
            raise ApiError(400, "'max_tokens' must be at least 1 (0 only scores the prompt, with 'echo': true)",
                           param="max_tokens")
    # null means "the default", as in OpenAI's API
    params.temperature = _number(_given(body, "temperature", 1.0), "temperature", float, low=0, high=2)
    params.top_p = _number(_given(body, "top_p", 1.0), "top_p", float, low=0, high=1)
    top_k = _number(_given(body, "top_k", 0), "top_k", int, low=-1, high=1 << 30)
    params.top_k = max(0, top_k)
    if params.top_p == 0:
        raise ApiError(400, "'top_p' must be > 0 (use temperature 0 for greedy decoding)", param="top_p")
    if body.get("seed") is not None:
        params.seed = _number(body["seed"], "seed", int, low=-(2**63), high=2**63 - 1) % 2**63
    params.n = _number(_given(body, "n", 1), "n", int, low=1, high=MAX_N)
    params.best_of = params.n if body.get("best_of") is None else _number(body["best_of"], "best_of", int, low=1,
                                                                             high=MAX_BEST_OF)
    if params.best_of < params.n:
        raise ApiError(400, f"'best_of' ({params.best_of}) must be at least 'n' ({params.n})", param="best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        setattr(params, name, _number(_given(body, name, 0.0), name, float, low=-2, high=2))
    params.logit_bias = _logit_bias(body.get("logit_bias"))
    params.stop = _stop(body.get("stop"))
    params.stream = _flag(body, "stream")
    params.tokens_as_ids = _flag(body, "return_tokens_as_token_ids")
    if params.stream and params.best_of > params.n:
        raise ApiError(400, "'best_of' > 'n' cannot be streamed: the best ones are known only at the end",
                       param="best_of")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")
    params.include_usage = bool(options.get("include_usage", False))
    if body.get("adapters") is not None:
        params.adapters = _adapters(body["adapters"])
    if len(params.prompts or [None]) * params.best_of > MAX_PROMPTS:
        raise ApiError(400, f"{len(params.prompts)} prompts x {params.best_of} choices is over {MAX_PROMPTS} rows; "
                            "send fewer per request", param="prompt" if len(params.prompts) > 1 else "n")
    return params


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", param=name)
    return bool(value)


def _chat_logprobs(body: dict) -> int | None:
    """Chat's `logprobs` (true/false) and `top_logprobs` (0-20, needs logprobs) as one count or None."""
    wanted = _flag(body, "logprobs")
    if body.get("top_logprobs") is None:
        return 0 if wanted else None
    top = _number(body["top_logprobs"], "top_logprobs", int, low=0, high=MAX_LOGPROBS)
    if not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return top


def _logit_bias(bias) -> dict[int, float]:
    """{"token id": bias} with ids as decimal strings (JSON keys) and biases in [-100, 100]; the ids are
    checked against the vocabulary by the caller, which knows it."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must be an object {\"token id\": bias from -100 to 100}", param="logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"'logit_bias' has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12):
            raise ApiError(400, f"'logit_bias' keys must be token ids (non-negative integers), got {key!r}",
                           param="logit_bias")
        out[int(key)] = _number(value, f"logit_bias.{key}", float, low=-100, high=100)
    return out


def _given(body: dict, name: str, default):
    return default if body.get(name) is None else body[name]


def _number(value, name: str, kind: type, low: float | None = None, high: float | None = None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, int) and abs(value) > 2**63:  # too big for any field (and for math.isfinite)
        ok = False
    ok = ok and math.isfinite(value)
    if kind is int and ok and float(value) != int(value):
        ok = False
    if not ok:
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=name)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", param=name)
    return value


def _prompts(prompt) -> list[str | list[int]]:
    """OpenAI's four forms: a string, a list of strings, a list of token ids, a list of such lists."""
    if isinstance(prompt, str) or _token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and len(prompt) <= MAX_PROMPTS:
        if all(isinstance(p, str) for p in prompt) or all(_token_ids(p) for p in prompt):
            return list(prompt)
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
    raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either",
                   param="prompt")


def _token_ids(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value))


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return stops


def _adapters(mix) -> dict[str, float]:
    if not isinstance(mix, dict):
        raise ApiError(400, "'adapters' must be an object {adapter name: scale}", param="adapters")
    return {name: _number(scale, f"adapters.{name}", float, low=-8, high=8) for name, scale in mix.items()}


# -- stop strings ---------------------------------------------------------------------------------


def decoder(tokenizer):
    """(`ids -> text` as `tokenizer.decode(ids, skip_special_tokens=True)` gives it, whether a token's text
    depends only on the tokens before it). The Rust tokenizer's own decode where transformers' wrapper would
    only call it (half the time of the wrapper, which the server pays for every token); else the wrapper,
    whose `clean_up_tokenization_spaces` may change text around a token (" ." -> "."): not incremental."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False \
            and callable(getattr(backend, "decode", None)):
        return (lambda ids: backend.decode(ids, skip_special_tokens=True)), True
    return (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)), False


class TextStream:
    """Token ids in, text deltas out: holds back incomplete UTF-8 and anything that may begin a stop string.

    Each token's text is decoded in a window of the tokens before it (vLLM's incremental detokenization):
    the text of the window with the new tokens, less the text of the window without them. The window
    starts at the last tokens that showed text (the prompt's last few at first), so it always holds
    some: SentencePiece-style decoders drop a leading space at the start of a text and WordPiece adds
    none, which would glue words together if a token were decoded alone or after skipped special tokens.
    Decoding every token of the answer again at every step costs O(n) per token; this is O(1). A tokenizer
    that cleans up spaces (`decoder`) still decodes the whole answer at every token, as it is what the
    answer's text is.
    """

    def __init__(self, tokenizer, stop: list[str], context: list[int] = ()):
        (self.decode, self.incremental), self.stop = decoder(tokenizer), stop
        self.ids: list[int] = list(context[-4:])  # the window starts in the prompt's last few tokens
        self.start, self.end = 0, len(self.ids)  # ids[start:end]: decoded already; ids[end:]: not yet
        self.skip = 0 if self.incremental else len(self.decode(self.ids))  # not incremental: text = all after it
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False
        self.incomplete = False  # the last token ended inside a character: `text` waits for the rest

    def add(self, token: int) -> str:
        """The new text that is safe to show; sets `stopped` when a stop string appears (it is cut off)."""
        self.ids.append(token)
        if not self.incremental:
            text = self.decode(self.ids)[self.skip:]
            self.incomplete = text.endswith("\ufffd")
            if self.incomplete:  # a character split across tokens: wait for the rest
                return ""
            self.text = text
        else:
            window = self.ids[self.start:]
            before = self.decode(window[:self.end - self.start])
            after = self.decode(window)
            self.incomplete = after.endswith("\ufffd")
            if self.incomplete:
                return ""
            shown = after[len(before):]
            self.text += shown
            # The window moves on only past tokens that showed text: a token decoded after nothing but skipped
            # special tokens would lose the leading space that Metaspace- and WordPiece-style decoders give it.
            if shown:
                self.start = self.end
            self.end = len(self.ids)
        text = self.text
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(text) - self._held_back(text)
        delta, self.sent = text[self.sent:end], max(self.sent, end)
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        """At the end: whatever was held back (no stop string completed)."""
        if self.stopped:
            return ""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
