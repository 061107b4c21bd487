"""A calendar (tools: tools/calendar.json): events with ids ev1, ev2, ... on days of one week; events on a day may
not overlap. State: {"events": {"ev1": {"title", "date", "start", "end", "attendees"}}}. Tasks: book a meeting at
the first free slot of a day (the agent must look at the day first), move an event, cancel an event.
"""

from __future__ import annotations

import random

from kimi_jax.agentic.environment import Environment, ToolError
from kimi_jax.agentic.tasks import ABSENT, Checkpoint, Rubric, Task, make_agent, task_id, task_rng
from kimi_jax.agentic.tools import TOOLS_DIR, load_tool_file

NAME = "calendar"
TOOLS = load_tool_file(TOOLS_DIR / "calendar.json")
DAYS = [f"2026-03-{d:02d}" for d in range(2, 7)]
_TITLES = ["Standup", "Design review", "1:1 with Sam", "Budget sync", "Hiring panel", "Lunch with Priya",
           "Customer call", "Sprint planning", "Dentist", "Team retro"]


def minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def hhmm(total: int) -> str:
    return f"{total // 60:02d}:{total % 60:02d}"


def free_slot(events: list[dict], date: str, duration: int, start: str = "09:00", end: str = "18:00") -> str | None:
    """The earliest start (30-minute grid) on `date` from which `duration` minutes overlap no event."""
    busy = [(minutes(e["start"]), minutes(e["end"])) for e in events if e["date"] == date]
    for t in range(minutes(start), minutes(end) - duration + 1, 30):
        if all(t + duration <= s or t >= e for s, e in busy):
            return hhmm(t)
    return None


def make_setup(rng: random.Random) -> dict:
    events = []
    for date in DAYS:
        t = 8 * 60 + 30 * rng.randint(0, 4)
        for _ in range(rng.randint(1, 4)):
            length = 30 * rng.randint(1, 4)
            if t + length > 18 * 60:
                break
            events.append({"id": f"ev{len(events) + 1}", "title": rng.choice(_TITLES), "date": date,
                           "start": hhmm(t), "end": hhmm(t + length), "attendees": []})
            t += length + 30 * rng.randint(0, 3)
    return {"events": events}


class CalendarEnv(Environment):
    name = NAME

    def _setup(self, task: Task) -> None:
        self.events = {e["id"]: {k: v for k, v in e.items() if k != "id"} for e in task.setup["events"]}
        self.next_id = len(self.events) + 1

    def _check(self, date: str, start: str, end: str, ignore: str | None = None) -> None:
        if not (minutes(start) < minutes(end) <= 24 * 60):
            raise ToolError(f"start {start} must be before end {end} on the same day")
        for eid, e in self.events.items():
            if eid != ignore and e["date"] == date and minutes(start) < minutes(e["end"]) \
                    and minutes(e["start"]) < minutes(end):
                raise ToolError(f"{date} {start}-{end} overlaps {eid} ({e['title']}, {e['start']}-{e['end']})")

    def _get(self, event_id: str) -> dict:
        if event_id not in self.events:
            raise ToolError(f"no event with id {event_id!r}")
        return self.events[event_id]

    def _execute(self, name: str, a: dict):
        if name == "list_events":
            day = sorted(((e["start"], eid) for eid, e in self.events.items() if e["date"] == a["date"]))
            return {"date": a["date"], "events": [{"event_id": eid, **self.events[eid]} for _, eid in day]}
        if name == "create_event":
            self._check(a["date"], a["start"], a["end"])
            eid = f"ev{self.next_id}"
            self.next_id += 1
            self.events[eid] = {"title": a["title"], "date": a["date"], "start": a["start"], "end": a["end"],
                                "attendees": list(a.get("attendees", []))}
            return {"event_id": eid, **self.events[eid]}
        if name == "move_event":
            event = self._get(a["event_id"])
            self._check(a["date"], a["start"], a["end"], ignore=a["event_id"])
            event.update(date=a["date"], start=a["start"], end=a["end"])
            return {"event_id": a["event_id"], **event}
        if name == "delete_event":
            self._get(a["event_id"])
            del self.events[a["event_id"]]
            return {"deleted": a["event_id"]}
        raise ToolError(f"tool {name!r} is not available in the {NAME} environment")

    def state(self) -> dict:
        return {"events": {eid: dict(e) for eid, e in self.events.items()}}


def make_task(seed: int, index: int) -> Task:
    rng = task_rng(seed, index, NAME)
    setup = make_setup(rng)
    events = setup["events"]
    agent = make_agent("calendar", TOOLS, rng)
    tid = task_id(NAME, seed, index)
    kind = rng.choice(["book", "move", "cancel"])
    if kind == "book":
        date, duration = rng.choice(DAYS), rng.choice([30, 60, 90])
        start = free_slot(events, date, duration)
        if start is not None:
            title = rng.choice(["Project kickoff", "Interview", "Coffee chat", "Board prep"])
            end, eid = hhmm(minutes(start) + duration), f"ev{len(events) + 1}"
            new = {"title": title, "date": date, "start": start, "end": end, "attendees": []}
            return Task(tid, NAME, agent, f"Please put a {duration}-minute \"{title}\" on {date} at the earliest "
                        f"free time from 09:00.", setup, {f"events/{eid}": new},
                        Rubric((f"\"{title}\" is booked on {date} {start}-{end}", "no existing event was touched"),
                               ("list_events", "create_event"),
                               (Checkpoint("list_events", {"date": date}, "looked at the day first"),
                                Checkpoint("create_event", {"date": date, "start": start, "end": end},
                                           "booked the earliest free slot")), (start,)),
                        ({"name": "list_events", "arguments": {"date": date}},
                         {"name": "create_event", "arguments": {"title": title, "date": date, "start": start,
                                                                "end": end}}),
                        f"Booked \"{title}\" on {date} from {start} to {end}.")
    event = rng.choice(events)
    eid, title, date = event["id"], event["title"], event["date"]
    if kind == "move":
        duration = minutes(event["end"]) - minutes(event["start"])
        new_date = rng.choice([d for d in DAYS if d != date])
        start = free_slot(events, new_date, duration, start="13:00")
        if start is not None:
            end = hhmm(minutes(start) + duration)
            return Task(tid, NAME, agent, f"Move my \"{title}\" at {event['start']} on {date} to {new_date} at "
                        f"{start}, same length.", setup,
                        {f"events/{eid}/date": new_date, f"events/{eid}/start": start, f"events/{eid}/end": end},
                        Rubric((f"{eid} is on {new_date} {start}-{end}",), ("list_events", "move_event"),
                               (Checkpoint("move_event", {"event_id": eid, "date": new_date, "start": start},
                                           "moved the right event"),), (new_date, start)),
                        ({"name": "list_events", "arguments": {"date": date}},
                         {"name": "move_event", "arguments": {"event_id": eid, "date": new_date, "start": start,
                                                              "end": end}}),
                        f"\"{title}\" is now on {new_date} from {start} to {end}.")
    return Task(tid, NAME, agent, f"Cancel my \"{title}\" at {event['start']} on {date}, please.", setup,
                {f"events/{eid}": ABSENT, **{f"events/{e['id']}/date": e["date"] for e in events if e is not event}},
                Rubric((f"{eid} is deleted and nothing else",), ("list_events", "delete_event"),
                       (Checkpoint("delete_event", {"event_id": eid}, "deleted the right event"),), (title,)),
                ({"name": "list_events", "arguments": {"date": date}},
                 {"name": "delete_event", "arguments": {"event_id": eid}}),
                f"Cancelled \"{title}\" on {date} at {event['start']}.")
