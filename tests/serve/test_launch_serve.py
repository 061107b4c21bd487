"""launch/serve.py end to end: an HF checkpoint written by save_hf, served by the script in a subprocess, answers
the openai client with the greedy tokens of kimi_jax.infer.generate on the same model."""

import os
import socket
import subprocess
import sys
import time

import httpx
import openai

import kimi_jax
from kimi_jax import chat
from kimi_jax.data import ByteTokenizer
from kimi_jax.infer import generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_serve_script_answers_the_openai_client(tmp_path):
    model = kimi_jax.create_model(kimi_jax.tiny(initializer_range=0.1), seed=1)
    kimi_jax.save_hf(model, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, os.path.join(ROOT, "launch", "serve.py"), f"--model={tmp_path}", f"--port={port}",
           "--served_model_name=tiny-hf", "--max_slots=2", "--num_pages=32", "--max_seq_len=128",
           "--prefill_chunk=32"]
    server = subprocess.Popen(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok":
                    break
            except httpx.TransportError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=240)
        assert [m.id for m in client.models.list().data] == ["tiny-hf"]
        out = client.completions.create(model="tiny-hf", prompt="def main(", max_tokens=6, temperature=0)
        tok = ByteTokenizer()
        want = generate(model, [[tok.bos_id] + tok.encode("def main(")], max_new_tokens=6).tokens[0].tolist()
        stops = set(chat.stop_token_ids(tok))
        cut = next((i + 1 for i, t in enumerate(want) if t in stops), len(want))    # the server stops there
        assert out.choices[0].text == tok.decode([t for t in want[:cut] if t not in stops])
        assert out.usage.completion_tokens == cut and out.weight_version == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
