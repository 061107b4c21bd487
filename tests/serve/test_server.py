"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP.

The tiny model is first fitted (a few seconds of Adam) to one tool-calling dialogue, so that greedy decoding of its
prompt produces a real Kimi tool-call section: the server must parse it into `tool_calls`.
"""

import json
import socket
import threading
import time

import httpx
import jax
import numpy as np
import openai
import optax
import pytest
import uvicorn
from flax import nnx

import kimi_jax
from kimi_jax import chat
from kimi_jax.data import ByteTokenizer
from kimi_jax.serve import Engine, EngineConfig
from kimi_jax.serve.async_engine import AsyncEngine
from kimi_jax.serve.server import create_app

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"role": "assistant", "content": "Checking.", "tool_calls": [
    {"id": "functions.get_weather:0", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
TOKENIZER = ByteTokenizer()


def _fit(model, steps=150):
    """Adam on the assistant tokens of USER + CALL until greedy decoding reproduces them."""
    ids, mask = chat.encode(TOKENIZER, USER + [CALL], tools=TOOLS)
    ids, mask = np.asarray([ids]), np.asarray([mask], np.float32)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(ids[:, :-1]).astype(np.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
            return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(steps):
        loss = step(model, optimizer)
    assert float(loss) < 0.01, float(loss)
    return model


@pytest.fixture(scope="module")
def server():
    model = _fit(kimi_jax.create_model(kimi_jax.tiny(), seed=0))
    engine = Engine(model, EngineConfig(max_slots=4, page_size=16, num_pages=100, max_seq_len=512,
                                        prefill_chunk=128), stop_token_ids=chat.stop_token_ids(TOKENIZER),
                    weight_version=7)
    async_engine = AsyncEngine(engine, max_pending=8).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(async_engine, TOKENIZER, model_name="tiny"), host="127.0.0.1", port=port,
                            log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    http.should_exit = True
    thread.join()
    async_engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_chat_with_tools_returns_parsed_tool_calls(client):
    out = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=80)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    [call] = choice.message.tool_calls
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "functions.get_weather:0", "get_weather", {"city": "Paris"})
    assert out.weight_version == 7
    prompt_ids, _ = chat.encode(TOKENIZER, USER, tools=TOOLS, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(prompt_ids)


def test_chat_streaming_equals_the_whole_response(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, temperature=0,
                                                 max_tokens=80, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == "Checking." and reasons == ["tool_calls"]
    assert [(t.id, t.function.name, t.function.arguments) for t in calls] == [
        ("functions.get_weather:0", "get_weather", '{"city": "Paris"}')]
    assert len(chunks) > 5                                       # the content came token by token
    _, mask = chat.encode(TOKENIZER, USER + [CALL], tools=TOOLS)
    assert chunks[-1].usage.completion_tokens == sum(mask)      # the assistant turn and its <|im_end|>


def test_completions_with_logprobs(client):
    out = client.completions.create(model="tiny", prompt="def main(", max_tokens=12, temperature=0, logprobs=2)
    ids = [TOKENIZER.bos_id] + TOKENIZER.encode("def main(")
    choice = out.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert len(choice.logprobs.token_logprobs) == out.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert out.usage.prompt_tokens == len(ids)
    again = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert again.choices[0].text == choice.text                  # token-id prompts equal text prompts


def test_n_samples_with_a_seed_are_reproducible(client):
    kwargs = dict(model="tiny", prompt="import ", max_tokens=8, temperature=1.0, n=3, seed=5)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["weight_version"] == 7


def test_bad_requests_get_4xx_json_and_do_not_disturb_others(client, server):
    url = server[0]
    stream = client.completions.create(model="tiny", prompt="class ", max_tokens=30, temperature=0, stream=True)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=5)
    with pytest.raises(openai.BadRequestError, match="max_seq_len"):
        client.completions.create(model="tiny", prompt="x" * 600, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="more than the whole cache"):
        client.completions.create(model="tiny", prompt="x" * 10, max_tokens=490, n=4)
    bad = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    bad = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": "hi"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    text = "".join(c.choices[0].text for c in stream if c.choices)
    whole = client.completions.create(model="tiny", prompt="class ", max_tokens=30, temperature=0)
    assert text == whole.choices[0].text and len(text) > 0


def test_stop_strings_cut_the_text(client):
    whole = client.completions.create(model="tiny", prompt="def ", max_tokens=24, temperature=0).choices[0].text
    stop = whole[5:7]
    cut = client.completions.create(model="tiny", prompt="def ", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[:whole.index(stop)] and cut.choices[0].finish_reason == "stop"
