"""An LLM-simulated tool environment: an LLM backend plays the tools, keeping a JSON state summary across calls,
and seeded failures are injected (for tools with no real implementation: weather, notes, flights, evolved tools).

Each call sends the simulator a system message (SIMULATOR_PROMPT) and a user message

    TOOL:  {the tool's OpenAI spec}
    STATE: {the state summary, JSON}
    CALL:  {"name": ..., "arguments": {...}}

and expects one JSON object {"result": <the tool's output>, "state": <the updated state summary>}. A reply that
is not such an object is sent back once with what is wrong; a second bad reply (or a backend failure) becomes
{"error": ..., "retryable": true}. Before each call a seeded draw injects a failure with the given rates:
"error" (a 503, nothing happens), "timeout" (nothing happens) or "partial" (the call runs, but list results are
cut to their first half and marked "partial": true). `scripted_simulator` is a deterministic stand-in for the LLM.
Its tasks are made by kimi_jax.agentic.simulated_tasks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from kimi_jax.agentic.backends import Backend, BackendError, text_of
from kimi_jax.agentic.environment import Environment, ToolError
from kimi_jax.agentic.tasks import Task
from kimi_jax.agentic.tools import tool_name

NAME = "simulated"
SIMULATOR_PROMPT = ("You simulate a software tool. Given its specification, the current state summary and one "
                    "call, answer with exactly one JSON object {\"result\": ..., \"state\": ...}: the realistic "
                    "output of the call, and the state summary after it (keep every fact later calls may need).")
DEFAULT_FAILURES = {"error": 0.05, "timeout": 0.05, "partial": 0.05}


def parse_simulator_reply(text: str) -> tuple[dict | None, str]:
    """-> ({"result", "state"}, "") or (None, what is wrong)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None, "the reply holds no JSON object"
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        return None, f"the reply's JSON does not parse: {e}"
    if not isinstance(value, dict) or "result" not in value or not isinstance(value.get("state"), dict):
        return None, "the JSON object needs \"result\" and \"state\" (an object)"
    return value, ""


class SimulatedToolEnv(Environment):
    name = NAME

    def __init__(self, simulator: Backend, *, failures: dict[str, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.simulator = simulator
        self.failures = dict(DEFAULT_FAILURES if failures is None else failures)
        unknown = set(self.failures) - set(DEFAULT_FAILURES)
        if unknown or sum(self.failures.values()) > 1:
            raise ValueError(f"failures: kinds must be among {sorted(DEFAULT_FAILURES)} with rates summing to "
                             f"<= 1, got {self.failures}")

    def _setup(self, task: Task) -> None:
        self.sim_state = json.loads(json.dumps(task.setup))
        self.injected: list[str] = []

    def _draw_failure(self) -> str | None:
        u, edge = self.rng.random(), 0.0
        for kind in sorted(self.failures):
            edge += self.failures[kind]
            if u < edge:
                self.injected.append(kind)
                return kind
        return None

    def _execute(self, name: str, arguments: dict):
        spec = next(t for t in self.task.agent.tools if tool_name(t) == name)
        failure = self._draw_failure()
        if failure == "error":
            return {"error": "503 service unavailable", "retryable": True}
        if failure == "timeout":
            return {"error": "the tool timed out after 30 s", "retryable": True}
        prompt = [{"role": "system", "content": SIMULATOR_PROMPT},
                  {"role": "user", "content": f"TOOL: {json.dumps(spec)}\nSTATE: {json.dumps(self.sim_state)}\n"
                                              f"CALL: {json.dumps({'name': name, 'arguments': arguments})}"}]
        seed = self.rng.randrange(2**31)
        for attempt in range(2):
            try:
                text = text_of(self.simulator.chat(prompt, seed=seed, temperature=0.0))
            except BackendError as e:
                return {"error": f"tool simulator unavailable: {e}", "retryable": True}
            reply, problem = parse_simulator_reply(text)
            if reply is not None:
                break
            prompt = prompt + [{"role": "assistant", "content": text},
                               {"role": "user", "content": f"Invalid reply: {problem}. Answer with the JSON object."}]
        else:
            raise ToolError(f"the tool simulator gave no valid reply ({problem})")
        self.sim_state = reply["state"]
        result = reply["result"]
        if failure == "partial" and isinstance(result, dict):
            result = {k: v[:len(v) // 2] if isinstance(v, list) else v for k, v in result.items()}
            result["partial"] = True
        return result

    def state(self) -> dict:
        return self.sim_state


def _digest(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12], 16)


def scripted_simulator(messages: Sequence[dict], tools=None) -> str:
    """Deterministic tool behaviour for the shipped simulated domains (a stand-in for an LLM): notes kept in
    state["notes"], bookings in state["bookings"], weather and flights derived from a hash of the arguments."""
    lines = messages[-1]["content"].split("\n")
    state = json.loads(lines[1][len("STATE: "):])
    call = json.loads(lines[2][len("CALL: "):])
    name, a = call["name"], call["arguments"]
    h = _digest(name, a)
    conditions = ["sunny", "cloudy", "rain", "snow", "windy"]
    if name == "get_current_weather":
        result = {"city": a["city"], "temperature": h % 35 - 5, "condition": conditions[h % 5], "humidity": h % 100}
    elif name == "get_forecast":
        result = {"city": a["city"], "days": [{"day": d + 1, "high": (h >> d) % 30, "low": (h >> d) % 30 - 8,
                                               "condition": conditions[(h >> d) % 5]} for d in range(a["days"])]}
    elif name == "create_note":
        notes = state.setdefault("notes", [])
        note = {"note_id": f"n{len(notes) + 1}", "title": a["title"], "body": a["body"], "tags": a.get("tags", [])}
        notes.append(note)
        result = note
    elif name == "search_notes":
        q = a["query"].lower()
        result = {"notes": [n for n in state.get("notes", []) if q in (n["title"] + n["body"]).lower()
                            and ("tag" not in a or a["tag"] in n["tags"])]}
    elif name == "delete_note":
        before = state.get("notes", [])
        state["notes"] = [n for n in before if n["note_id"] != a["note_id"]]
        result = {"deleted": a["note_id"]} if len(before) > len(state["notes"]) else {"error": "no such note"}
    elif name == "search_flights":
        result = {"flights": [{"flight_id": f"{a['origin']}{a['destination']}{h % 900 + 100 + k}",
                               "departs": f"{a['date']}T{6 + 3 * k:02d}:00", "price": 80 + (h >> k) % 400}
                              for k in range(3)]}
    else:
        result = {"ok": True, "echo": a}
    return json.dumps({"result": result, "state": state})
