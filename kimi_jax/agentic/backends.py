"""LLM backends behind one interface: `backend.chat(messages, tools=None, **sampling) -> assistant message`.

The returned message is OpenAI-style: {"role": "assistant", "content": str | None, ["tool_calls": [...]]}. A
backend that could not parse the model's tool calls returns the raw text (special tokens included) as content,
as the project's server does; environments parse that text with `kimi_jax.chat.parse_assistant`.

    EngineBackend(engine, tokenizer) the rollout engine in-process (kimi_jax.serve.Engine, one thread):
                                     rendered, generated and parsed as the project's server does; its
                                     generate(prompts, tools) gives token ids and logprobs (multi-turn RL)
    OpenAIBackend(base_url, model)   any OpenAI-compatible endpoint (the project's server, vLLM, SGLang):
                                     per-request timeout, retries with exponential backoff on 429 / 5xx /
                                     timeouts / connection errors, a token-bucket rate limit
    ScriptedBackend(respond)         deterministic: `respond(messages, tools)` gives the reply (tests, demos)

Failures after the last retry raise BackendError naming the endpoint, the status and the attempts made.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from typing import Any, Callable, Protocol, Sequence

Message = dict[str, Any]


class Backend(Protocol):
    def chat(self, messages: Sequence[Message], tools: Sequence[dict] | None = None, **sampling) -> Message: ...


class BackendError(RuntimeError):
    """A request that failed for good; `status` is the HTTP status (None for timeouts and connection errors)."""

    def __init__(self, message: str, status: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.status, self.attempts = status, attempts


def text_of(message: Message) -> str:
    """The text content of an assistant message ("" when None)."""
    return message.get("content") or ""


class TokenBucket:
    """Rate limit: `rate` requests per second on average, bursts of up to `capacity`. acquire() blocks until a
    token is free and returns the seconds it waited. Thread-safe; `clock`/`sleep` are injectable."""

    def __init__(self, rate: float, capacity: float = 1.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0 or capacity < 1:
            raise ValueError(f"token bucket needs rate > 0 and capacity >= 1, got rate={rate}, capacity={capacity}")
        self.rate, self.capacity, self._clock, self._sleep = rate, capacity, clock, sleep
        self._tokens, self._last = capacity, clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return waited
                wait = (1 - self._tokens) / self.rate
            self._sleep(wait)
            waited += wait


@dataclasses.dataclass
class BackendStats:
    requests: int = 0        # calls of chat()
    attempts: int = 0        # HTTP requests sent (retries included)
    retries: int = 0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)   # "429", "timeout", "connection", "500"...
    rate_limited_s: float = 0.0                                           # time spent waiting on the bucket


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint through the official `openai` client.

    timeout_s: per HTTP request. max_retries: extra attempts after a retryable failure (429, 5xx, timeout,
    connection error; a 4xx other than 429 fails at once), waiting backoff_s * 2**k (capped at max_backoff_s,
    jittered by a seeded +-25%) before retry k. rate: requests per second through a TokenBucket (None: no
    limit); burst: its capacity. `stats` counts requests, attempts, retries and failures by kind."""

    def __init__(self, base_url: str, model: str, *, api_key: str = "unused", timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 rate: float | None = None, burst: float = 1.0, seed: int = 0, **default_sampling):
        import openai

        if max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"need max_retries >= 0 and timeout_s > 0, got {max_retries}, {timeout_s}")
        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.base_url, self.model, self.max_retries = base_url, model, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.bucket = TokenBucket(rate, burst) if rate else None
        self.default_sampling = default_sampling
        self.stats = BackendStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _failure_kind(self, error: Exception) -> str | None:
        """"429" / "5xx code" / "timeout" / "connection" for retryable errors, None for the others."""
        o = self._openai
        if isinstance(error, o.APITimeoutError):
            return "timeout"
        if isinstance(error, o.APIConnectionError):
            return "connection"
        if isinstance(error, o.APIStatusError) and (error.status_code == 429 or error.status_code >= 500):
            return str(error.status_code)
        return None

    def _count(self, kind: str) -> None:
        with self._lock:
            self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1

    def chat(self, messages: Sequence[Message], tools: Sequence[dict] | None = None, **sampling) -> Message:
        kwargs = {**self.default_sampling, **sampling}
        if tools:
            kwargs["tools"] = list(tools)
        with self._lock:
            self.stats.requests += 1
        for attempt in range(self.max_retries + 1):
            if self.bucket is not None:
                waited = self.bucket.acquire()
                with self._lock:
                    self.stats.rate_limited_s += waited
            with self._lock:
                self.stats.attempts += 1
                self.stats.retries += attempt > 0
            try:
                out = self.client.chat.completions.create(model=self.model, messages=list(messages), **kwargs)
            except self._openai.OpenAIError as e:
                kind = self._failure_kind(e)
                status = getattr(e, "status_code", None)
                if kind is None:
                    raise BackendError(f"{self.base_url}: request failed ({status}): {e}", status, attempt + 1) from e
                self._count(kind)
                if attempt == self.max_retries:
                    raise BackendError(f"{self.base_url}: {kind} after {attempt + 1} attempt(s): {e}", status,
                                       attempt + 1) from e
                with self._lock:
                    jitter = self._rng.uniform(0.75, 1.25)
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * jitter)
                continue
            return _message_dict(out.choices[0].message)
        raise AssertionError("unreachable")


def _message_dict(message) -> Message:
    out: Message = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in message.tool_calls]
    return out


def reply_message(tokenizer, tokens: Sequence[int], stop_ids: Sequence[int],
                  tools: Sequence[dict] | None) -> Message:
    """Generated token ids -> the assistant message the server returns: the text without stop tokens, parsed into
    tool_calls when they are well-formed, else the raw text (special tokens included) as content."""
    from kimi_jax import chat

    text = tokenizer.decode([t for t in tokens if t not in stop_ids])
    parsed = chat.parse_assistant(text, tools)
    if parsed.ok and parsed.tool_calls:
        return {"role": "assistant", "content": parsed.content or None, "tool_calls": parsed.tool_calls}
    return {"role": "assistant", "content": text}


class EngineBackend:
    """The engine in-process: messages (+ tools) -> chat.encode(..., add_generation_prompt=True) -> one Request ->
    the generated text up to the stop token -> parsed into tool_calls (raw text as content when the calls are
    malformed), as the server's /v1/chat/completions does. Sampling keywords: temperature, top_p, top_k,
    max_tokens, seed; others are ignored. A request the engine refuses raises BackendError (status 400).
    enforce: constrain tool-call sections to well-formed calls of the offered tools (kimi_jax.serve.enforcer;
    off by default: rollouts then see the model's own formatting, and sampling stays the policy whose logprobs
    the engine reports); tools outside the enforcer's schema subset are then not enforced.

    `generate(prompts, tools, ...)` is the token-level form (multi-turn RL, kimi_jax.agentic.rl): many prompts
    in one engine run, each giving the engine's SampleOutput (token ids, their logprobs, finish reason)."""

    def __init__(self, engine, tokenizer, *, max_tokens: int = 512, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, enforce: bool = False):
        from kimi_jax import chat

        self._chat, self.engine, self.tokenizer = chat, engine, tokenizer
        self.defaults = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=0)
        self.stop_ids = tuple(chat.stop_token_ids(tokenizer))
        self.enforce = enforce

    def _enforcer(self, messages: Sequence[Message], tools: Sequence[dict] | None):
        earlier = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
        return self._enforcer_at(tools, earlier)

    def _enforcer_at(self, tools: Sequence[dict] | None, first_call_index: int):
        if not (self.enforce and tools):
            return None
        from kimi_jax.serve.enforcer import ToolCallEnforcer

        try:
            return ToolCallEnforcer(list(tools), self.tokenizer, first_call_index=first_call_index)
        except (ValueError, TypeError, KeyError):
            return None

    def generate(self, prompts: Sequence[Sequence[int]], tools: Sequence[Sequence[dict] | None], *,
                 first_call_indices: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
                 **sampling) -> list:
        """One sample per prompt (token ids), all queued before one engine run -> [SampleOutput] in order.
        tools[i]: the tools offered to prompt i (the enforcer's grammar when enforce); first_call_indices[i]: the
        calls earlier in its dialogue (the enforcer's first call id; default 0); seeds[i] overrides the seed."""
        from kimi_jax.serve.engine import Request, RequestError

        params = {**self.defaults, **{k: v for k, v in sampling.items() if k in self.defaults and v is not None}}
        first_call_indices = first_call_indices or [0] * len(prompts)
        rids = []
        try:
            for i, (prompt, offered) in enumerate(zip(prompts, tools, strict=True)):
                seed = params["seed"] if seeds is None else int(seeds[i])
                rids.append(self.engine.add_request(Request(
                    list(prompt), stop_token_ids=self.stop_ids,
                    enforcer=self._enforcer_at(offered, first_call_indices[i]), **{**params, "seed": seed})))
        except RequestError as e:
            for rid in rids:
                self.engine.abort(rid)
                self.engine.discard(rid)
            raise BackendError(f"engine refused the request: {e}", 400, 1) from e
        results = self.engine.run()
        out = [results[rid].samples[0] for rid in rids]
        for rid in rids:
            self.engine.discard(rid)
        return out

    def reply(self, tokens: Sequence[int], tools: Sequence[dict] | None) -> Message:
        return reply_message(self.tokenizer, tokens, self.stop_ids, tools)

    def chat(self, messages: Sequence[Message], tools: Sequence[dict] | None = None, **sampling) -> Message:
        ids, _ = self._chat.encode(self.tokenizer, list(messages), list(tools) if tools else None,
                                   add_generation_prompt=True)
        earlier = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
        sample = self.generate([ids], [tools], first_call_indices=[earlier], **sampling)[0]
        return self.reply(sample.tokens, tools)


class ScriptedBackend:
    """Deterministic replies from `respond(messages, tools) -> str | message dict` (a str becomes the content).
    `calls` records every (messages, tools) it was asked, for inspection."""

    def __init__(self, respond: Callable[[Sequence[Message], Sequence[dict] | None], str | Message]):
        self.respond = respond
        self.calls: list[tuple[list[Message], list[dict] | None]] = []

    def chat(self, messages: Sequence[Message], tools: Sequence[dict] | None = None, **sampling) -> Message:
        self.calls.append((list(messages), None if tools is None else list(tools)))
        reply = self.respond(messages, tools)
        return {"role": "assistant", "content": reply} if isinstance(reply, str) else reply
