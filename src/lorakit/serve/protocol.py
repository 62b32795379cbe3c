"""OpenAI's request fields, checked, and its response and error shapes.

Requests are plain JSON objects checked field by field, so every mistake becomes a 400 that names the
field (OpenAI's error shape: {"error": {"message", "type", "param", "code"}}). Unknown fields that
change nothing (user, metadata, ...) are ignored; fields that would change the output but are not
supported here (n > 1, logprobs, penalties, tools, ...) are refused rather than silently dropped.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field


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
    prompt: str | list[int] = ""  # completions: text or token ids
    messages: list[dict] = field(default_factory=list)  # chat
    max_tokens: int | None = None  # None: as many as the context and the server's cap allow
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extra field; 0 (or -1): off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    adapters: dict[str, float] | None = None  # lorakit's extension: a mix {adapter: scale}


# Fields that would change the answer and that this server does not implement, with the values that
# change nothing (and so are accepted: clients often send the defaults explicitly).
_UNSUPPORTED = {"n": [1], "best_of": [1], "logprobs": [False, 0], "top_logprobs": [0], "echo": [False],
                "suffix": [""], "frequency_penalty": [0], "presence_penalty": [0], "logit_bias": [{}],
                "tools": [[]], "functions": [[]], "response_format": [{"type": "text"}],
                # vLLM's extra sampling fields
                "min_p": [0], "repetition_penalty": [1], "length_penalty": [1], "stop_token_ids": [[]],
                "ignore_eos": [False], "min_tokens": [0], "use_beam_search": [False]}


def parse_request(body: dict, chat: bool) -> GenerationParams:
    """Check a /v1/completions (chat=False) or /v1/chat/completions body; raise ApiError(400) naming the field."""
    for name, harmless in _UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in harmless:
            raise ApiError(400, f"'{name}' = {body[name]!r} is not supported by this server; leave it out", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the base model's name or an adapter's (see GET /v1/models)",
                       param="model")
    params = GenerationParams(model=model)
    if chat:
        params.messages = _messages(body.get("messages"))
        tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        params.prompt = _prompt(body.get("prompt"))
        tokens = body.get("max_tokens", 16)  # OpenAI's default for completions
    if tokens is not None:
        params.max_tokens = _number(tokens, "max_tokens", int, low=1)
    # null means "the default", as in OpenAI's API
    params.temperature = _number(_given(body, "temperature", 1.0), "temperature", float, low=0, high=2)
    params.top_p = _number(_given(body, "top_p", 1.0), "top_p", float, low=0, high=1)
    top_k = _number(_given(body, "top_k", 0), "top_k", int, low=-1, high=1 << 30)
    params.top_k = max(0, top_k)
    if params.top_p == 0:
        raise ApiError(400, "'top_p' must be > 0 (use temperature 0 for greedy decoding)", param="top_p")
    if body.get("seed") is not None:
        params.seed = _number(body["seed"], "seed", int, low=-(2**63), high=2**63 - 1) % 2**63
    params.stop = _stop(body.get("stop"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "'stream' must be true or false", param="stream")
    params.stream = bool(stream)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")
    params.include_usage = bool(options.get("include_usage", False))
    if body.get("adapters") is not None:
        params.adapters = _adapters(body["adapters"])
    return params


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


def _prompt(prompt) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "'prompt' holds several prompts; send one per request", param="prompt")
    raise ApiError(400, "'prompt' must be a string (or a list of token ids)", param="prompt")


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


class TextStream:
    """Token ids in, text deltas out: holds back incomplete UTF-8 and anything that may begin a stop string."""

    def __init__(self, tokenizer, stop: list[str], context: list[int] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        # The text is decoded after the prompt's last few tokens and then cut: SentencePiece-style
        # decoders drop a leading space at the start of a text, which would glue words together.
        self.ids: list[int] = list(context[-4:])
        self.skip = len(tokenizer.decode(self.ids, skip_special_tokens=True))
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text that is safe to show; sets `stopped` when a stop string appears (it is cut off)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)[self.skip:]
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        self.text = text
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


# -- responses ------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, chat: bool, use: dict | None) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}
    if use is not None:
        body["usage"] = use
    return body


def chunk_body(rid: str, model: str, text: str | None, finish: str | None, chat: bool, first: bool = False) -> dict:
    """One server-sent event of a stream ('chat.completion.chunk' or 'text_completion')."""
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}
