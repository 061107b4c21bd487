"""Synthesis output: shard records are the manifest's conversations, tokenised with an assistant-only loss mask;
a parallel run killed midway and resumed writes each trajectory once, and what one process would have written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kimi_jax import chat
from kimi_jax.agentic import ScriptedBackend, SynthesisConfig, read_shard, synthesize
from kimi_jax.agentic.synthesis import manifest_path, run_unit, shard_path
from kimi_jax.chat.template import IM_END
from kimi_jax.data import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = ByteTokenizer()


def _outputs(out_dir, units):
    """-> ({task_id: (ids, mask)} of kept records, [every task id in the manifests], manifests)."""
    records, seen, manifests = {}, [], []
    for unit in range(units):
        manifest = json.loads(manifest_path(out_dir, unit).read_text())
        shard = read_shard(shard_path(out_dir, unit))
        assert len(shard) == len(manifest["kept"])
        for entry, record in zip(manifest["kept"], shard):
            assert entry["task_id"] not in records
            records[entry["task_id"]] = record
        seen += [k["task_id"] for k in manifest["kept"]] + [r["task_id"] for r in manifest["rejected"]]
        manifests.append(manifest)
    return records, seen, manifests


def test_records_are_encoded_conversations_with_assistant_only_loss(tmp_path):
    config = SynthesisConfig(output_dir=str(tmp_path), num_tasks=12, shard_size=6, error_rate=0.3)
    summary = synthesize(config)
    records, seen, manifests = _outputs(tmp_path, 2)
    assert sorted(seen) == sorted(t for m in manifests for t in m["task_ids"]) and len(seen) == 12
    assert summary["kept"] == len(records) and summary["kept"] + summary["rejected"] == 12
    assert 0 < summary["kept"] < 12 and sum(summary["by_kind"].values()) >= summary["rejected"]
    assert summary["kept_tokens"] == sum(len(ids) for ids, _ in records.values())
    for manifest in manifests:
        for entry in manifest["kept"]:
            ids, mask = records[entry["task_id"]]
            expected_ids, expected_mask = chat.encode(TOKENIZER, entry["messages"], entry["tools"])
            assert ids.tolist() == expected_ids and mask.tolist() == expected_mask
            # the masked tokens are exactly the assistant turns, each closed by <|im_end|>
            assistant = [m for m in entry["messages"] if m["role"] == "assistant"]
            trained = TOKENIZER.decode(ids[mask == 1].tolist())
            assert trained.count(IM_END) == len(assistant)
            assert trained.endswith(assistant[-1]["content"] + IM_END)
            untrained = TOKENIZER.decode(ids[mask == 0].tolist())
            assert entry["messages"][0]["content"] in untrained and "## Return of functions." in untrained
            assert "## Return of" not in trained and np.all(np.isin(mask, [0, 1]))


def test_resume_redoes_unfinished_units_only(tmp_path):
    config = SynthesisConfig(output_dir=str(tmp_path), num_tasks=10, shard_size=2)
    run_unit(config, 0)
    run_unit(config, 3)
    os.remove(manifest_path(tmp_path, 3))                        # killed between its shard and its manifest
    shard_path(tmp_path, 1).with_suffix(".array_record.tmp").write_bytes(b"half a shard")   # killed mid-write
    done_before = manifest_path(tmp_path, 0).stat().st_mtime_ns
    summary = synthesize(config)
    assert summary["units_run"] == 4 and manifest_path(tmp_path, 0).stat().st_mtime_ns == done_before
    records, seen, _ = _outputs(tmp_path, 5)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 10 and summary["kept"] == len(records)
    assert synthesize(config)["units_run"] == 0
    with pytest.raises(ValueError, match="holds a run with other settings"):
        synthesize(SynthesisConfig(output_dir=str(tmp_path), num_tasks=10, shard_size=2, seed=1))


def test_a_killed_parallel_run_resumes_with_each_trajectory_exactly_once(tmp_path):
    """launch/synthesize.py with 2 workers is SIGKILLed (with its workers) after 3 shards; the resumed run
    finishes the rest, and the output is byte for byte that of one uninterrupted single-process run."""
    out, n, shard = tmp_path / "run", 120, 4
    cmd = [sys.executable, str(REPO / "launch/synthesize.py"), f"--output_dir={out}", f"--num_tasks={n}",
           f"--shard_size={shard}", "--workers=2", "--seed=2"]
    proc = subprocess.Popen(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not (out.exists() and len(list(out.glob("shard-*.json"))) >= 3):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                      # the run and its worker processes
        proc.wait()
    finished = len(list(out.glob("shard-*.json")))
    assert 3 <= finished < n // shard, "the run was not killed midway"
    summary = synthesize(SynthesisConfig(output_dir=str(out), num_tasks=n, shard_size=shard, seed=2))
    assert summary["units_run"] == n // shard - finished
    records, seen, _ = _outputs(out, n // shard)
    assert len(seen) == len(set(seen)) == n and summary["kept"] == len(records)
    assert not list(out.glob("*.tmp"))
    whole = tmp_path / "whole"
    synthesize(SynthesisConfig(output_dir=str(whole), num_tasks=n, shard_size=shard, seed=2))
    for unit in range(n // shard):
        assert manifest_path(out, unit).read_text() == manifest_path(whole, unit).read_text()
        assert shard_path(out, unit).read_bytes() == shard_path(whole, unit).read_bytes()


def _evolver(messages, tools):
    if "application domains" in messages[-1]["content"]:
        return json.dumps([{"domain": "budgeting", "description": "personal budgets"}])
    return json.dumps([
        {"name": "add_expense", "description": "Record an expense in a budget category.",
         "inputSchema": {"type": "object", "properties": {"amount": {"type": "number", "exclusiveMinimum": 0},
                                                          "category": {"type": "string", "enum": ["food", "rent"]}},
                         "required": ["amount", "category"], "additionalProperties": False}},
        {"name": "get_forecast", "description": "Clashes with the weather tool.",
         "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}}}])


def test_evolved_tools_join_the_run_through_generic_tasks(tmp_path):
    config = SynthesisConfig(output_dir=str(tmp_path), num_tasks=16, shard_size=8, envs=("simulated",),
                             error_rate=0.0, evolve_categories=("finance",))
    evolver = ScriptedBackend(_evolver)
    summary = synthesize(config, evolver)
    assert summary["evolution"]["domains"] == [["finance", "budgeting"]] and summary["evolution"]["tools"] == 1
    assert summary["evolution"]["rejected"][0]["reason"].startswith("name conflict: 'get_forecast'")
    assert summary["tools"] == 23 and summary["kept"] == 16 and summary["rejected"] == 0
    _, _, manifests = _outputs(tmp_path, 2)
    generic = [k for m in manifests for k in m["kept"] if k["messages"][1]["content"].startswith("I need this")]
    assert generic, "no generic task over the evolved tool"
    call = generic[0]["messages"][2]["tool_calls"][0]["function"]
    assert call["name"] == "add_expense" and json.loads(call["arguments"])["category"] in ("food", "rent")
    assert [t["function"]["name"] for t in generic[0]["tools"]] == ["add_expense"]
    calls = len(evolver.calls)
    synthesize(config, evolver)                                  # resumed: the evolution is not redone
    assert len(evolver.calls) == calls
    nothing = synthesize(SynthesisConfig(output_dir=str(tmp_path / "none"), num_tasks=2, envs=("simulated",),
                                         evolve_categories=("finance",)), ScriptedBackend(lambda m, t: "no"))
    assert nothing["evolution"]["tools"] == 0 and nothing["tools"] == 22      # all rejected: the run goes on
    with pytest.raises(ValueError, match="tool evolution needs an LLM"):
        synthesize(SynthesisConfig(output_dir=str(tmp_path / "x"), num_tasks=1, evolve_categories=("a",)))
