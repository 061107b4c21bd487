"""Judge trajectories: rule checks, then an LLM judge against the task's rubric; only passing ones are kept.

Rule checks give reasons "kind: detail" with kinds
    backend_error     the agent's backend failed
    not_done          the episode ended without a final answer (truncated at max_turns, or cut short)
    malformed_calls   any malformed tool call (parse or schema error) during the episode
    end_state         the environment's goal was not reached (its goal_failures)
    missing_tools     a rubric tool never called
    tool_order        the rubric tools' first calls came in another order
    checkpoint        a rubric checkpoint (tool + argument values) never hit
Only if all rules pass is the LLM judge asked (JUDGE_PROMPT: task, criteria, facts the answer must state, the
transcript, the final answer); it must answer a JSON object {"verdict": "pass" | "fail", "reason": "..."}
(parse_verdict). Kinds: llm_judge (a fail verdict), llm_judge_unparseable, llm_judge_error (backend failure).
`scripted_judge` is a deterministic stand-in for that LLM that checks the facts are in the final answer.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Sequence

from kimi_jax.agentic.backends import Backend, BackendError, text_of
from kimi_jax.agentic.rollout import Trajectory
from kimi_jax.agentic.tasks import Task

JUDGE_PROMPT = ("You judge whether an AI assistant completed a task with tools. Read the rubric and the transcript "
                "and answer with one JSON object {\"verdict\": \"pass\" or \"fail\", \"reason\": \"...\"}. "
                "Fail it if any success criterion is not met or the final answer misses a required fact.")
MENTIONS_MARKER = "THE FINAL ANSWER MUST STATE: "
ANSWER_MARKER = "FINAL ANSWER:\n"


@dataclasses.dataclass
class Verdict:
    passed: bool
    reasons: list[str]            # "kind: detail", empty when passed

    @property
    def kinds(self) -> list[str]:
        return [r.split(":", 1)[0] for r in self.reasons]


def rule_checks(task: Task, trajectory: Trajectory) -> list[str]:
    reasons = []
    if trajectory.backend_error:
        reasons.append(f"backend_error: {trajectory.backend_error}")
    if not trajectory.done or trajectory.truncated or trajectory.final_answer is None:
        reasons.append("not_done: no final answer" + (" (truncated)" if trajectory.truncated else ""))
    if trajectory.errors:
        kinds = sorted({e["kind"] for e in trajectory.errors})
        reasons.append(f"malformed_calls: {len(trajectory.errors)} ({', '.join(kinds)})")
    if trajectory.goal_failures:
        reasons.append("end_state: " + "; ".join(trajectory.goal_failures))
    called = [c["name"] for c in trajectory.calls]
    missing = [t for t in task.rubric.expected_tools if t not in called]
    if missing:
        reasons.append(f"missing_tools: {missing}")
    else:
        order = sorted(task.rubric.expected_tools, key=called.index)
        if order != list(task.rubric.expected_tools):
            reasons.append(f"tool_order: first calls came as {order}, expected {list(task.rubric.expected_tools)}")
    for checkpoint in task.rubric.checkpoints:
        if not any(checkpoint.hit_by(c["name"], c["arguments"]) for c in trajectory.calls):
            reasons.append(f"checkpoint: {checkpoint.description} ({checkpoint.tool} {checkpoint.arguments})")
    return reasons


def judge_prompt(task: Task, trajectory: Trajectory) -> list[dict]:
    lines = []
    for m in trajectory.messages[1:-1]:
        if m.get("tool_calls"):
            lines += [f"ASSISTANT CALLS {c['function']['name']}({c['function']['arguments']})" for c in m["tool_calls"]]
        else:
            lines.append(f"{m['role'].upper()}: {m.get('content') or ''}")
    rubric = task.rubric
    body = (f"TASK: {task.prompt}\nSUCCESS CRITERIA:\n" + "\n".join(f"- {c}" for c in rubric.success_criteria)
            + f"\n{MENTIONS_MARKER}{json.dumps(list(rubric.answer_mentions))}\nTRANSCRIPT:\n" + "\n".join(lines)
            + f"\n{ANSWER_MARKER}{trajectory.final_answer or ''}")
    return [{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": body}]


def parse_verdict(text: str) -> tuple[bool | None, str]:
    """The judge's reply -> (passed, reason); passed is None when no verdict can be read. Takes the last JSON
    object with a "verdict", else a bare `verdict: pass|fail`."""
    for match in reversed(list(re.finditer(r"\{[^{}]*\}", text))):
        try:
            value = json.loads(match.group())
        except json.JSONDecodeError:
            continue
        verdict = str(value.get("verdict", "")).strip().lower()
        if verdict in ("pass", "fail"):
            return verdict == "pass", str(value.get("reason", ""))
    match = re.search(r"verdict\W+(pass|fail)\b", text, re.IGNORECASE)
    if match:
        return match.group(1).lower() == "pass", ""
    return None, f"no verdict in {text[:200]!r}"


def judge(task: Task, trajectory: Trajectory, llm: Backend | None = None, *, seed: int = 0) -> Verdict:
    """Rule checks, then (if they pass and `llm` is given) the LLM judge."""
    reasons = rule_checks(task, trajectory)
    if not reasons and llm is not None:
        try:
            text = text_of(llm.chat(judge_prompt(task, trajectory), seed=seed, temperature=0.0))
        except BackendError as e:
            return Verdict(False, [f"llm_judge_error: {e}"])
        passed, why = parse_verdict(text)
        if passed is None:
            reasons.append(f"llm_judge_unparseable: {why}")
        elif not passed:
            reasons.append(f"llm_judge: {why}")
    return Verdict(not reasons, reasons)


def scripted_judge(messages: Sequence[dict], tools=None) -> str:
    """Deterministic judge: pass iff the final answer states every required fact (case-insensitive)."""
    prompt = messages[-1]["content"]
    mentions = json.loads(prompt.split(MENTIONS_MARKER, 1)[1].split("\n", 1)[0])
    answer = prompt.split(ANSWER_MARKER, 1)[1].lower()
    missing = [m for m in mentions if m.lower() not in answer]
    if missing:
        return json.dumps({"verdict": "fail", "reason": f"the final answer does not state {missing}"})
    return json.dumps({"verdict": "pass", "reason": "all criteria met"})


class RejectionStats:
    """Counts of judged trajectories: kept, rejected, and rejections by reason kind (a trajectory counts once
    per kind)."""

    def __init__(self):
        self.kept, self.rejected, self.by_kind = 0, 0, collections.Counter()

    def add(self, verdict: Verdict) -> None:
        if verdict.passed:
            self.kept += 1
        else:
            self.rejected += 1
            self.by_kind.update(set(verdict.kinds))

    def merge(self, other: dict) -> None:
        self.kept += other["kept"]
        self.rejected += other["rejected"]
        self.by_kind.update(other["by_kind"])

    def to_json(self) -> dict:
        return {"kept": self.kept, "rejected": self.rejected, "by_kind": dict(sorted(self.by_kind.items()))}
