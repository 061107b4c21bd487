"""A simulated user (persona) for multi-turn tasks, driven by an LLM backend.

The backend gets a system message describing the persona (name, style, goal, FACTS as JSON: what the user
knows and tells only when asked) and a user message with the dialogue so far, ending with

    LAST ASSISTANT MESSAGE:
    {the assistant's last reply}

and answers with the user's next message, or DONE_MARKER when the request is handled or nothing is left to say.
`scripted_user` is a deterministic stand-in for that LLM: it tells each fact whose name the assistant mentions.
"""

from __future__ import annotations

import json
from typing import Sequence

from kimi_jax.agentic.backends import Backend, text_of
from kimi_jax.agentic.tasks import Task
from kimi_jax.data.tokenizers import CHAT_SPECIAL_TOKENS

DONE_MARKER = "[DONE]"
LAST_MARKER = "LAST ASSISTANT MESSAGE:\n"
FACTS_MARKER = "FACTS: "


def user_prompt(task: Task, dialogue: Sequence[dict]) -> list[dict]:
    persona = task.persona
    system = (f"You are {persona.name}, a user talking to an assistant. Write in a {persona.style} style, in the "
              f"first person, one short message at a time.\nYour request: {task.prompt}\n"
              f"Give these facts only when the assistant asks for them.\n{FACTS_MARKER}"
              f"{json.dumps(persona.facts, sort_keys=True)}\n"
              f"Reply with your next message only, or exactly {DONE_MARKER} when your request is handled or "
              f"nothing is left to say.")
    turns = [f"{m['role'].upper()}: {m.get('content') or ''}" for m in dialogue[:-1]
             if m["role"] in ("user", "assistant")]
    last = text_of(dialogue[-1]) if dialogue and dialogue[-1]["role"] == "assistant" else ""
    return [{"role": "system", "content": system},
            {"role": "user", "content": "DIALOGUE SO FAR:\n" + "\n".join(turns) + "\n\n" + LAST_MARKER + last}]


def clean_reply(text: str) -> str | None:
    """The user's message without chat special tokens; None when the user is done (or said nothing)."""
    for token in CHAT_SPECIAL_TOKENS:
        text = text.replace(token, "")
    text = text.strip()
    return None if not text or DONE_MARKER in text else text


class SimulatedUser:
    def __init__(self, backend: Backend):
        self.backend = backend

    def reply(self, task: Task, dialogue: Sequence[dict], *, seed: int = 0) -> str | None:
        """The persona's next message after the dialogue (ending with the assistant's reply), or None if done."""
        return clean_reply(text_of(self.backend.chat(user_prompt(task, dialogue), seed=seed, temperature=0.7)))


def scripted_user(messages: Sequence[dict], tools=None) -> str:
    """Deterministic persona: "My {fact} is {value}." for each fact named in the assistant's last message, else
    DONE_MARKER."""
    system, prompt = messages[0]["content"], messages[-1]["content"]
    facts = json.loads(system.split(FACTS_MARKER, 1)[1].split("\n", 1)[0])
    last = prompt.split(LAST_MARKER, 1)[1].lower()
    told = [f"My {name} is {value}." for name, value in sorted(facts.items()) if name.lower() in last]
    return " ".join(told) if told else DONE_MARKER
