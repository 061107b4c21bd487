"""Hierarchical evolution of synthetic tools through an LLM backend: category -> application domains -> tools.

    result = evolve_tools(backend, ["finance", "healthcare"], domains_per_category=3, tools_per_domain=4)
    result.tools      # validated, deduplicated OpenAI-style tools (x-category / x-domain set)
    result.rejected   # [(where, what the LLM returned, why it was rejected)]
    write_tool_file(dir / "finance-budgeting.json", "finance", "budgeting", tools)   # loadable by load_tools

DOMAINS_PROMPT asks for a JSON array of {"domain", "description"}; TOOLS_PROMPT asks for a JSON array of MCP
tools {"name", "description", "inputSchema"}. parse_json_array takes the outermost [...] of the reply. Every
domain must be a new non-empty string; every tool must pass validate_tool (JSON Schema Draft 2020-12) and must
not duplicate a tool already kept or given in `existing` (same name and normalised schema, or a name clash).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from kimi_jax.agentic.backends import Backend, BackendError, text_of
from kimi_jax.agentic.tools import ToolSpecError, deduplicate, to_openai

DOMAINS_PROMPT = ("You design software products. List {n} distinct application domains in the category "
                  "\"{category}\" that an assistant could act in through tools. Answer with a JSON array of "
                  "objects {{\"domain\": short name, \"description\": one sentence}} and nothing else.")
TOOLS_PROMPT = ("You design tool APIs for AI assistants. Define {n} tools for the application domain \"{domain}\" "
                "(category \"{category}\"): clear snake_case names, a one-sentence description stating what the "
                "tool returns, and a JSON Schema (Draft 2020-12, \"type\": \"object\") for the arguments with "
                "types, required fields and constraints. Answer with a JSON array of MCP tool objects "
                "{{\"name\", \"description\", \"inputSchema\"}} and nothing else.")


@dataclasses.dataclass
class EvolutionResult:
    domains: list[tuple[str, str]] = dataclasses.field(default_factory=list)    # (category, domain)
    tools: list[dict] = dataclasses.field(default_factory=list)
    rejected: list[tuple[str, Any, str]] = dataclasses.field(default_factory=list)


def parse_json_array(text: str) -> tuple[list | None, str]:
    """The outermost JSON array in an LLM reply -> (list, "") or (None, why not)."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        return None, "the reply holds no JSON array"
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        return None, f"the reply's JSON does not parse: {e}"
    return (value, "") if isinstance(value, list) else (None, "not a JSON array")


def _ask(backend: Backend, prompt: str, seed: int) -> tuple[list | None, str]:
    try:
        text = text_of(backend.chat([{"role": "user", "content": prompt}], seed=seed, temperature=0.8))
    except BackendError as e:
        return None, f"backend failed: {e}"
    return parse_json_array(text)


def evolve_tools(backend: Backend, categories: Sequence[str], *, domains_per_category: int = 3,
                 tools_per_domain: int = 4, existing: Sequence[dict] = (), seed: int = 0) -> EvolutionResult:
    """Ask `backend` for domains of each category, then tools of each domain (module docstring)."""
    result = EvolutionResult()
    seen_domains: set[str] = set()
    for c, category in enumerate(categories):
        domains, why = _ask(backend, DOMAINS_PROMPT.format(n=domains_per_category, category=category), seed + c)
        if domains is None:
            result.rejected.append((f"category {category!r}", None, why))
            continue
        for d, entry in enumerate(domains[:domains_per_category]):
            domain = entry.get("domain") if isinstance(entry, dict) else None
            where = f"category {category!r} domain {d}"
            if not isinstance(domain, str) or not domain.strip():
                result.rejected.append((where, entry, "a domain needs a non-empty \"domain\" string"))
                continue
            domain = domain.strip()
            if domain.lower() in seen_domains:
                result.rejected.append((where, entry, f"domain {domain!r} was already evolved"))
                continue
            seen_domains.add(domain.lower())
            result.domains.append((category, domain))
            _evolve_domain(backend, category, domain, tools_per_domain, existing, result, seed + 1000 * (c + 1) + d)
    return result


def _evolve_domain(backend, category, domain, n, existing, result: EvolutionResult, seed: int) -> None:
    entries, why = _ask(backend, TOOLS_PROMPT.format(n=n, domain=domain, category=category), seed)
    if entries is None:
        result.rejected.append((f"domain {domain!r}", None, why))
        return
    for k, entry in enumerate(entries):
        where = f"evolved {category}/{domain} [tools {k}]"
        try:
            tool = to_openai(entry, domain=domain, category=category, where=where)
        except ToolSpecError as e:
            result.rejected.append((where, entry, str(e)))
            continue
        kept, dropped = deduplicate([*existing, *result.tools, tool])
        if dropped and dropped[-1][0] is tool:
            result.rejected.append((where, entry, dropped[-1][1]))
        else:
            result.tools.append(tool)


def write_tool_file(path: str | os.PathLike, category: str, domain: str, tools: Sequence[dict]) -> None:
    """Write tools as a tool file (MCP form) that load_tool_file reads back; atomic."""
    entries = [{"name": t["function"]["name"], "description": t["function"]["description"],
                "inputSchema": t["function"]["parameters"]} for t in tools]
    path = os.fspath(path)
    with open(path + ".tmp", "w") as f:
        json.dump({"category": category, "domain": domain, "tools": entries}, f, indent=1)
    os.replace(path + ".tmp", path)
