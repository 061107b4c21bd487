"""OpenAI API request parsing and response pieces for the server (no web framework here).

`completion_params` / `chat_params` turn a request body into an engine Request plus what the response needs,
raising APIError (HTTP status, message, offending parameter) for anything invalid. `SampleText` follows one
sample's tokens: incremental detokenisation (no half UTF-8 characters are emitted) and stop strings (text is
held back while it could still be the start of one).
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from kimi_jax.serve.engine import Request
from kimi_jax.serve.forward import NUM_TOP_LOGPROBS


class APIError(Exception):
    """status: HTTP status; kind: OpenAI error type; param: the request field at fault (or None)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _get(body: dict, name: str, kinds, default, *, check=None, rule: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be {rule or kinds}, got {value!r}", name)
    if not isinstance(value, kinds) or (check is not None and not check(value)):
        raise APIError(400, f"'{name}' must be {rule or kinds}, got {value!r}", name)
    return value


@dataclasses.dataclass
class Params:
    """What one API call asks for: the engine request and the response options."""

    request: Request
    stream: bool
    logprobs: int | None           # alternatives per token to return (None: no logprobs)
    stop: list[str]
    include_usage: bool = False    # stream_options.include_usage: a last chunk with the usage


def _sampling(body: dict, model: str, prompt_ids: list[int], stop_ids: tuple[int, ...], max_tokens_key: str,
              logprobs: int | None) -> Params:
    if body.get("model") not in (None, model):
        raise APIError(404, f"The model '{body.get('model')}' does not exist; this server serves '{model}'",
                       "model", "model_not_found")
    max_tokens = _get(body, max_tokens_key, int, 16, check=lambda v: v >= 1, rule="an integer >= 1")
    if max_tokens_key != "max_tokens":
        max_tokens = _get(body, "max_tokens", int, max_tokens, check=lambda v: v >= 1, rule="an integer >= 1")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to 4, got {body.get('stop')!r}",
                       "stop")
    extra_stop = _get(body, "stop_token_ids", list, [], check=lambda v: all(isinstance(t, int) for t in v),
                      rule="a list of token ids")
    request = Request(
        prompt=prompt_ids, max_tokens=max_tokens,
        temperature=float(_get(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2,
                               rule="a number in [0, 2]")),
        top_p=float(_get(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, rule="a number in (0, 1]")),
        top_k=_get(body, "top_k", int, 0, check=lambda v: v >= 0, rule="an integer >= 0"),
        seed=_get(body, "seed", int, secrets.randbelow(2 ** 30), check=lambda v: 0 <= v < 2 ** 30,
                  rule="an integer in [0, 2**30)"),
        n=_get(body, "n", int, 1, check=lambda v: v >= 1, rule="an integer >= 1"),
        stop_token_ids=tuple(stop_ids) + tuple(extra_stop))
    options = _get(body, "stream_options", dict, {}, rule="an object")
    return Params(request, bool(_get(body, "stream", bool, False, rule="a boolean")), logprobs, stop,
                  bool(options.get("include_usage", False)))


def completion_params(body: dict, model: str, tokenizer, stop_ids: tuple[int, ...]) -> Params:
    """POST /v1/completions: prompt (a string, BOS prepended, or a list of token ids)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise APIError(400, "'prompt' must be a string or a non-empty list of token ids (one prompt per call)",
                       "prompt")
    if body.get("echo"):
        raise APIError(400, "'echo' is not supported", "echo")
    logprobs = _get(body, "logprobs", int, None, check=lambda v: 0 <= v <= NUM_TOP_LOGPROBS,
                    rule=f"an integer in [0, {NUM_TOP_LOGPROBS}]")
    return _sampling(body, model, ids, stop_ids, "max_tokens", logprobs)


def _enforcer(body: dict, messages: list, tools: list | None, tokenizer):
    """The ToolCallEnforcer of a chat request with tools, or None. The extra field `enforce_tool_calls`: absent
    (enforce when the tools' schemas are in the supported subset, else not), true (enforce; 400 when they are
    not) or false (never)."""
    from kimi_jax.serve.enforcer import ToolCallEnforcer

    enforce = _get(body, "enforce_tool_calls", bool, None, rule="a boolean")
    if not tools or enforce is False:
        return None
    earlier = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
    try:
        return ToolCallEnforcer(tools, tokenizer, first_call_index=earlier)
    except (ValueError, TypeError, KeyError) as e:
        if enforce:
            raise APIError(400, f"tool calls cannot be enforced for these tools: {e}", "tools") from e
        return None


def chat_params(body: dict, model: str, tokenizer, stop_ids: tuple[int, ...]) -> tuple[Params, list | None]:
    """POST /v1/chat/completions: messages (+ tools) rendered with the Kimi chat template -> (Params, tools).
    With tools, the request carries a ToolCallEnforcer (see `_enforcer`): a tool-call section the model opens
    can only hold well-formed calls of those tools."""
    from kimi_jax import chat
    messages, tools = body.get("messages"), body.get("tools")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "'messages' must be a non-empty list of message objects", "messages")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise APIError(400, "'tools' must be a list of tool objects", "tools")
    try:
        ids, _ = chat.encode(tokenizer, messages, tools=tools or None, add_generation_prompt=True)
    except (ValueError, TypeError, KeyError) as e:
        raise APIError(400, f"messages cannot be rendered: {e}", "messages") from e
    top = _get(body, "top_logprobs", int, 0, check=lambda v: 0 <= v <= NUM_TOP_LOGPROBS,
               rule=f"an integer in [0, {NUM_TOP_LOGPROBS}]")
    logprobs = top if _get(body, "logprobs", bool, False, rule="a boolean") else None
    params = _sampling(body, model, ids, stop_ids, "max_completion_tokens", logprobs)
    enforcer = _enforcer(body, messages, tools, tokenizer)
    if enforcer is not None:
        params.request = dataclasses.replace(params.request, enforcer=enforcer)
    return params, tools or None


class SampleText:
    """One sample's text as its tokens arrive: `push(token)` -> newly final text; stop strings end it."""

    def __init__(self, tokenizer, stop: list[str], stop_ids: set[int]):
        self.tokenizer, self.stop, self.stop_ids = tokenizer, stop, stop_ids
        self.tokens: list[int] = []
        self.text = ""                  # all text so far (stop string excluded once hit)
        self.emitted = 0                # characters of text already handed out
        self.stopped = False            # a stop string was hit

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        if token not in self.stop_ids:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        hold = 0
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
                break
        if not self.stopped:
            if text.endswith("\ufffd"):
                hold = 1                                 # a multi-byte character still arriving
            for s in self.stop:                          # a suffix that may grow into a stop string
                hold = max(hold, max((k for k in range(1, len(s)) if text.endswith(s[:k])), default=0))
        self.text = text
        final = len(text) - hold
        new, self.emitted = text[self.emitted:final], max(self.emitted, final)
        return new

    def flush(self) -> str:
        """At the end: the held-back rest."""
        new, self.emitted = self.text[self.emitted:], len(self.text)
        return new


def token_logprobs(tokenizer, token: int, logprob: float, top: list[tuple[int, float]], k: int) -> dict[str, Any]:
    """A chat `logprobs.content` entry: token text, logprob, UTF-8 bytes and the k best alternatives."""
    def entry(t, lp):
        text = tokenizer.decode([t])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top[:k]]}
