"""The OpenAI-compatible HTTP server over the engine (Starlette on uvicorn).

    app = create_app(AsyncEngine(engine).start(), tokenizer, model_name="kimi-jax-tiny")
    uvicorn.run(app, port=8000)                       # or launch/serve.py

Endpoints: POST /v1/completions, POST /v1/chat/completions (Kimi chat template, tool calls parsed into
`tool_calls`; with `tools`, a tool-call section the model opens is constrained to well-formed calls of those
tools by kimi_jax.serve.enforcer, unless the extra field `enforce_tool_calls` is false; true makes tools whose
schemas it cannot enforce a 400), both with `stream`, `n`, `logprobs`, `seed`, `stop`, and the extras `top_k`
and `stop_token_ids`;
GET /v1/models; GET /health. Every response (and every stream chunk) carries `weight_version`, the version of
the weights that produced it (the highest one if weights changed mid-request). Errors are OpenAI-style JSON
bodies: 400 invalid parameters, malformed JSON or a prompt over the engine's limits, 404 unknown model, 429 the
bounded queue is full, 500 an engine failure; none of them touches other requests.
"""

from __future__ import annotations

import json
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from kimi_jax import chat
from kimi_jax.serve.async_engine import AsyncEngine, EngineBusy, EngineFailed
from kimi_jax.serve.engine import RequestError
from kimi_jax.serve.protocol import APIError, SampleText, chat_params, completion_params, token_logprobs


def create_app(engine: AsyncEngine, tokenizer, *, model_name: str) -> Starlette:
    stop_ids = tuple(chat.stop_token_ids(tokenizer))

    async def completions(http: HTTPRequest):
        return await _run(http, completion_params, "text_completion")

    async def chat_completions(http: HTTPRequest):
        return await _run(http, chat_params, "chat.completion")

    async def _run(http, parse, kind):
        created, rid = int(time.time()), ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        try:
            body = await _body(http)
            parsed = parse(body, model_name, tokenizer, stop_ids)
            params, tools = parsed if isinstance(parsed, tuple) else (parsed, None)
            stream = await engine.submit(params.request)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except RequestError as e:
            return _error(400, str(e), "messages" if kind == "chat.completion" else "prompt")
        except EngineBusy as e:
            return _error(429, str(e), None, "rate_limit_exceeded")
        run = _Response(tokenizer, params, tools, stop_ids, kind, rid, created, model_name, engine)
        if params.stream:
            return StreamingResponse(run.sse(stream), media_type="text/event-stream")
        try:
            async for event in stream:
                run.add(event)
                if run.all_stopped_by_string:
                    engine.abort(stream.request_id)
        except EngineFailed as e:
            return _error(500, str(e), None, "server_error")
        return JSONResponse(run.final())

    async def models(_):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "kimi-jax"}]})

    async def health(_):
        return JSONResponse({"status": "ok", "weight_version": engine.weight_version,
                             "running": engine.engine.num_running})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])])


async def _body(http: HTTPRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _error(status: int, message: str, param, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(APIError(status, message, param, kind).body(), status_code=status)


class _Response:
    """Accumulates one request's samples into an OpenAI response (whole, or as stream chunks)."""

    def __init__(self, tokenizer, params, tools, stop_ids, kind, rid, created, model, engine):
        self.tokenizer, self.params, self.tools, self.kind = tokenizer, params, tools, kind
        self.head = {"id": rid, "created": created, "model": model}
        self.engine = engine
        n = params.request.n
        self.texts = [SampleText(tokenizer, params.stop, set(stop_ids) | set(params.request.stop_token_ids))
                      for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.version = engine.weight_version
        self.completion_tokens = 0

    @property
    def all_stopped_by_string(self) -> bool:
        return all(t.stopped or r is not None for t, r in zip(self.texts, self.reasons))

    def add(self, event) -> str:
        """Take one TokenEvent -> the sample's newly final text."""
        i = event.index
        self.version = max(self.version, event.weight_version)
        new = ""
        if event.token is not None and not self.texts[i].stopped:
            self.completion_tokens += 1
            new = self.texts[i].push(event.token)
            if self.params.logprobs is not None:
                self.logprobs[i].append(token_logprobs(self.tokenizer, event.token, event.logprob,
                                                       event.top_logprobs, self.params.logprobs))
        if self.texts[i].stopped and self.reasons[i] is None:
            self.reasons[i] = "stop"
        elif event.finish_reason is not None and self.reasons[i] is None:
            self.reasons[i] = "length" if event.finish_reason == "length" else "stop"
        if self.reasons[i] is not None:
            new += self.texts[i].flush()
        return new

    def _choice(self, i: int) -> dict:
        text, reason = self.texts[i].text, self.reasons[i]
        if self.kind == "text_completion":
            lp = None
            if self.params.logprobs is not None:
                lp = {"tokens": [e["token"] for e in self.logprobs[i]],
                      "token_logprobs": [e["logprob"] for e in self.logprobs[i]],
                      "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in self.logprobs[i]]}
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
        message = self._message(text)
        if message.get("tool_calls") and reason == "stop":
            reason = "tool_calls"
        lp = {"content": self.logprobs[i]} if self.params.logprobs is not None else None
        return {"index": i, "message": message, "logprobs": lp, "finish_reason": reason}

    def _message(self, text: str) -> dict:
        parsed = chat.parse_assistant(text, self.tools)
        if parsed.ok and parsed.tool_calls:
            return {"role": "assistant", "content": parsed.content or None, "tool_calls": parsed.tool_calls}
        return {"role": "assistant", "content": text}

    def _usage(self) -> dict:
        prompt = len(self.params.request.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def final(self) -> dict:
        return {**self.head, "object": self.kind, "choices": [self._choice(i) for i in range(len(self.texts))],
                "usage": self._usage(), "weight_version": self.version}

    async def sse(self, stream):
        """Server-sent events: chunks as tokens arrive, then [DONE]. Chat tool calls come whole in the last chunk
        of their sample (text after <|tool_calls_section_begin|> is held back until it can be parsed)."""
        try:
            if self.kind == "chat.completion":
                for i in range(len(self.texts)):
                    yield self._chunk(i, {"role": "assistant", "content": ""}, None)
            shown = [0] * len(self.texts)
            async for event in stream:
                self.add(event)
                i = event.index
                visible = self._visible(i)
                if len(visible) > shown[i]:
                    yield self._chunk(i, visible[shown[i]:], None)
                    shown[i] = len(visible)
                if self.reasons[i] is not None:
                    yield self._chunk(i, None, self.reasons[i], last=True)
                if self.all_stopped_by_string:
                    self.engine.abort(stream.request_id)
            if self.params.include_usage:
                usage = {**self.head, "object": self._chunk_kind, "choices": [], "usage": self._usage(),
                         "weight_version": self.version}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        except EngineFailed as e:
            yield f"data: {json.dumps(APIError(500, str(e), None, 'server_error').body())}\n\n"
        finally:
            if not all(r is not None for r in self.reasons):
                self.engine.abort(stream.request_id)          # the client went away mid-stream

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"

    def _visible(self, i: int) -> str:
        """The text of sample i that may be streamed now (chat: up to a tool-call section)."""
        text = self.texts[i].text[:self.texts[i].emitted]
        if self.kind == "chat.completion":
            text = text.split("<|tool_calls_section_begin|>")[0]
        return text

    def _chunk(self, i: int, delta, reason, last: bool = False) -> str:
        if self.kind == "text_completion":
            choice = {"index": i, "text": delta or "", "logprobs": None, "finish_reason": reason}
        else:
            if last:
                choice = self._choice(i)
                message = choice.pop("message")
                delta = {"tool_calls": [{**c, "index": k} for k, c in enumerate(message["tool_calls"])]} \
                    if message.get("tool_calls") else {}
                choice = {"index": i, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": choice[
                    "finish_reason"]}
            else:
                choice = {"index": i, "delta": delta if isinstance(delta, dict) else {"content": delta},
                          "logprobs": None, "finish_reason": None}
        chunk = {**self.head, "object": self._chunk_kind, "choices": [choice], "weight_version": self.version}
        return f"data: {json.dumps(chunk)}\n\n"
