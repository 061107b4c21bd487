"""Tasks for the LLM-simulated tool environment: weather, notes and flights templates over the shipped tools, and
generic tasks over any other domain's tools (user-supplied MCP tools, evolved tools): one call with arguments
drawn from the tool's schema (kimi_jax.agentic.examples), judged by the rubric (expected tool, checkpoint)."""

from __future__ import annotations

import json
from typing import Sequence

from kimi_jax.agentic.env_simulated import NAME
from kimi_jax.agentic.examples import example_arguments
from kimi_jax.agentic.tasks import Checkpoint, Rubric, Task, make_agent, task_id, task_rng
from kimi_jax.agentic.tools import TOOLS_DIR, load_tools, tool_name, tools_by_domain

TEMPLATE_DOMAINS = {"weather": "weather", "note": "notes", "flights": "flights"}
PROGRAMMATIC_DOMAINS = ("accounts and orders", "calendar", "file system")


_CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Denver", "Hanoi"]
_AIRPORTS = ["JFK", "LHR", "CDG", "NRT", "SFO", "GRU", "DXB", "SIN"]


def make_task(seed: int, index: int, tools: Sequence[dict] | None = None) -> Task:
    """Task `index` under `seed` over `tools` (default: the shipped ones): a template kind whose domain is there,
    or "generic" when other domains with drawable arguments are there; deterministic."""
    rng = task_rng(seed, index, NAME)
    domains = tools_by_domain(load_tools(TOOLS_DIR) if tools is None else tools)
    generic = _generic_tools(domains)
    kinds = [k for k, d in TEMPLATE_DOMAINS.items() if d in domains] + (["generic"] if generic else [])
    if not kinds:
        raise ValueError(f"the simulated environment needs tools of the {sorted(TEMPLATE_DOMAINS.values())} "
                         f"domains or of another non-programmatic domain; got domains {sorted(domains)}")
    kind = rng.choice(kinds)
    tid = task_id(NAME, seed, index)
    if kind == "generic":
        return _generic_task(tid, rng, domains, generic)
    if kind == "weather":
        city, days = rng.choice(_CITIES), rng.randint(2, 5)
        agent = make_agent("weather", domains["weather"], rng)
        return Task(tid, NAME, agent, f"What's the weather in {city} now, and the forecast for the next {days} days?",
                    {}, {}, Rubric((f"reports current weather and a {days}-day forecast for {city}",),
                                   ("get_current_weather", "get_forecast"),
                                   (Checkpoint("get_forecast", {"city": city, "days": days},
                                               "asked for the forecast"),),
                                   (city,)),
                    ({"name": "get_current_weather", "arguments": {"city": city}},
                     {"name": "get_forecast", "arguments": {"city": city, "days": days}}),
                    f"The weather in {city} now, then the next {days} days: {{results}}")
    if kind == "note":
        title = rng.choice(["Groceries", "Gift ideas", "Reading list", "Trip plan"])
        body = rng.choice(["eggs, rice, lemons", "a scarf for Mia", "Dune; Middlemarch", "pack the charger"])
        agent = make_agent("notes", domains["notes"], rng)
        return Task(tid, NAME, agent, f"Save a note called \"{title}\" that says \"{body}\", tagged personal.",
                    {"notes": []}, {"notes/0/title": title, "notes/0/body": body},
                    Rubric((f"one note \"{title}\" holds \"{body}\" with tag personal",), ("create_note",),
                           (Checkpoint("create_note", {"title": title, "body": body}, "saved the note"),), (title,)),
                    ({"name": "create_note", "arguments": {"title": title, "body": body, "tags": ["personal"]}},),
                    f"Saved the note \"{title}\".")
    origin, destination = rng.sample(_AIRPORTS, 2)
    date = f"2026-04-{rng.randint(1, 28):02d}"
    agent = make_agent("flights", domains["flights"], rng)
    return Task(tid, NAME, agent, f"Which flights go from {origin} to {destination} on {date}?", {}, {},
                Rubric((f"lists the flights {origin}-{destination} on {date} with prices",), ("search_flights",),
                       (Checkpoint("search_flights", {"origin": origin, "destination": destination, "date": date},
                                   "searched the right route and day"),), (origin, destination)),
                ({"name": "search_flights", "arguments": {"origin": origin, "destination": destination,
                                                          "date": date}},),
                f"The flights from {origin} to {destination} on {date}: {{results}}")


def _generic_tools(domains: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Domain -> its tools for which example arguments can be drawn, over the non-template domains."""
    out = {}
    for domain, tools in sorted(domains.items()):
        if domain in TEMPLATE_DOMAINS.values() or domain in PROGRAMMATIC_DOMAINS:
            continue
        usable = [t for t in tools if example_arguments(t["function"]["parameters"], task_rng(0, 0, domain))]
        if usable:
            out[domain] = usable
    return out


def _generic_task(tid: str, rng, domains, generic) -> Task:
    domain = rng.choice(sorted(generic))
    tool = rng.choice(generic[domain])
    arguments = None
    while arguments is None:
        arguments = example_arguments(tool["function"]["parameters"], rng)
    name, description = tool_name(tool), tool["function"]["description"].rstrip(".")
    details = "; ".join(f"{k}: {json.dumps(v)}" for k, v in arguments.items()) or "nothing else"
    agent = make_agent(domain, domains[domain], rng)
    return Task(tid, NAME, agent, f"I need this done: {description[0].lower() + description[1:]}. Details: {details}.",
                {}, {}, Rubric((f"{name} is called with the user's details", "the result is reported"), (name,),
                               (Checkpoint(name, arguments, "called the tool with the user's details"),)),
                ({"name": name, "arguments": arguments},), "Done: {results}")
