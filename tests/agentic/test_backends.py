"""LLM backends: the token bucket, and OpenAIBackend (the official `openai` client) against the project's own
server over real HTTP: timeouts, 429 when the bounded queue is full, retries with backoff, no retry on a 400,
and an agent episode driven by the served (random, tiny) model that never crashes the environment; the
in-process EngineBackend replies as the server does.

The engine thread of the server starts late on purpose: until then a submitted request stays queued, which is
a stalled server (the client times out) whose queue (max_pending=1) is full (the next request gets 429)."""

import socket
import threading
import time

import pytest
import uvicorn

import kimi_jax
from kimi_jax import chat
from kimi_jax.agentic import (BackendError, EngineBackend, OpenAIBackend, ScriptedBackend, SimulatedToolEnv,
                              TokenBucket, judge, run_episode, scripted_simulator, simulated_tasks)
from kimi_jax.data import ByteTokenizer
from kimi_jax.serve import Engine, EngineConfig
from kimi_jax.serve.async_engine import AsyncEngine
from kimi_jax.serve.server import create_app

TOKENIZER = ByteTokenizer()
HELLO = [{"role": "user", "content": "Hi"}]


def test_token_bucket_limits_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, capacity=2, clock=lambda: now[0],
                         sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert [bucket.acquire() for _ in range(2)] == [0.0, 0.0]          # the burst
    assert bucket.acquire() == pytest.approx(0.5) and now[0] == pytest.approx(0.5)
    now[0] += 10.0                                                     # idle: refills to capacity, not beyond
    assert [bucket.acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(rate=0)


@pytest.fixture(scope="module")
def server():
    model = kimi_jax.create_model(kimi_jax.tiny(), seed=0)
    engine = Engine(model, EngineConfig(max_slots=2, page_size=16, num_pages=300, max_seq_len=2048,
                                        prefill_chunk=512), stop_token_ids=chat.stop_token_ids(TOKENIZER))
    async_engine = AsyncEngine(engine, max_pending=1)                  # started by the first test
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(create_app(async_engine, TOKENIZER, model_name="tiny"), host="127.0.0.1",
                                         port=port, log_level="error"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", async_engine, model
    http.should_exit = True
    thread.join()
    async_engine.stop()


@pytest.mark.slow
def test_timeouts_429_and_retries_against_the_real_server(server):
    url, async_engine, model = server
    stalled = OpenAIBackend(url, "tiny", timeout_s=1.0, max_retries=1, backoff_s=0.05, max_tokens=4)
    with pytest.raises(BackendError, match="429 after 2 attempt") as e:
        stalled.chat(HELLO)            # 1: queued in the stalled engine, times out; 2: the queue is full -> 429
    assert e.value.status == 429 and e.value.attempts == 2
    assert stalled.stats.failures == {"timeout": 1, "429": 1} and stalled.stats.retries == 1

    impatient = OpenAIBackend(url, "tiny", max_retries=0)
    with pytest.raises(BackendError, match="429 after 1 attempt"):
        impatient.chat(HELLO)
    assert impatient.stats.attempts == 1

    async_engine.start()               # the queued request now runs; retries with backoff get through
    patient = OpenAIBackend(url, "tiny", timeout_s=300, max_retries=30, backoff_s=0.1, max_backoff_s=1.0,
                            rate=50.0, temperature=1.0, max_tokens=8)
    first = patient.chat(HELLO, seed=1)
    assert first["role"] == "assistant" and isinstance(first["content"], str) and len(first["content"]) > 0
    assert patient.stats.attempts == patient.stats.retries + 1 == patient.stats.failures.get("429", 0) + 1
    assert patient.chat(HELLO, seed=1) == first                          # seeded: the same reply again
    assert patient.stats.requests == 2
    in_process = EngineBackend(Engine(model, EngineConfig(max_slots=2, page_size=16, num_pages=64, max_seq_len=512,
                                                          prefill_chunk=512)), TOKENIZER, temperature=1.0, max_tokens=8)
    assert in_process.chat(HELLO, seed=1) == first                       # the engine in-process, as served
    with pytest.raises(BackendError, match="engine refused the request: .*max_seq_len"):
        in_process.chat([{"role": "user", "content": "x" * 600}])

    with pytest.raises(BackendError, match="request failed \\(400\\)") as e:
        patient.chat(HELLO, temperature=5)                               # a bad request is not retried
    assert e.value.status == 400 and e.value.attempts == 1


@pytest.mark.slow
def test_an_agent_episode_through_the_server_never_crashes_the_environment(server):
    url, _, _ = server
    agent = OpenAIBackend(url, "tiny", timeout_s=300, max_retries=30, backoff_s=0.1, temperature=1.0,
                          max_tokens=24, seed=3)
    task = simulated_tasks.make_task(0, 1)
    env = SimulatedToolEnv(ScriptedBackend(scripted_simulator), max_turns=2)
    trajectory = run_episode(env, task, agent)
    assert trajectory.backend_error is None and trajectory.done
    assert trajectory.messages[0]["content"] == task.agent.system_prompt
    verdict = judge(task, trajectory)                                    # a random model does not do the job
    assert not verdict.passed and ("missing_tools" in verdict.kinds or "not_done" in verdict.kinds)
    for message in trajectory.messages:                                  # whatever it said renders as a dialogue
        assert message["role"] in ("system", "user", "assistant", "tool")
    ids, mask = chat.encode(TOKENIZER, trajectory.messages, trajectory.tools)
    assert len(ids) == len(mask) > 0
