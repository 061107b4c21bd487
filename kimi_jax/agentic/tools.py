"""Tool specs: load MCP-style tool definitions from JSON files, validate their JSON Schemas, deduplicate.

A tool file is a JSON object

    {"category": "commerce", "domain": "accounts and orders",
     "tools": [{"name": "get_order", "description": "...", "inputSchema": {JSON Schema of the arguments}}, ...]}

(the MCP `tools/list` shape; an OpenAI-style {"type": "function", "function": {"name", "description",
"parameters"}} entry is accepted too). Tools are handed around in the OpenAI form the chat template and the
server take: {"type": "function", "function": {"name", "description", "parameters"}}; `domain_of(tool)` and
`category_of(tool)` read the "x-domain" / "x-category" keys the loader adds beside "function" (`openai_form`
drops them: what an agent's toolset holds).

Validation (`validate_tool`): a name matching NAME_PATTERN (what a Kimi call id `functions.{name}:{idx}` can
carry), a non-empty description, and parameters that are a valid JSON Schema under the Draft 2020-12
meta-schema with "type": "object" at the top. Errors are ToolSpecError naming the file and the tool.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import jsonschema

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")
TOOLS_DIR = Path(__file__).parent / "tools"
_DOC_KEYS = ("description", "title", "examples", "$comment")

Tool = dict[str, Any]


class ToolSpecError(ValueError):
    """A tool definition that cannot be used; the message names the file and the tool."""


def tool_name(tool: Tool) -> str:
    return tool["function"]["name"]


def domain_of(tool: Tool) -> str:
    return tool.get("x-domain", "")


def category_of(tool: Tool) -> str:
    return tool.get("x-category", "")


def openai_form(tool: Tool) -> Tool:
    """The tool as a model sees it: {"type", "function"} only (no x-domain / x-category metadata)."""
    return {"type": "function", "function": tool["function"]}


def to_openai(entry: dict, *, domain: str = "", category: str = "", where: str = "tool") -> Tool:
    """One MCP-style ({name, description, inputSchema}) or OpenAI-style entry -> an OpenAI-style tool (validated)."""
    if not isinstance(entry, dict):
        raise ToolSpecError(f"{where}: a tool must be a JSON object, got {type(entry).__name__}")
    if entry.get("type") == "function" and isinstance(entry.get("function"), dict):
        function = entry["function"]
        name, description, parameters = function.get("name"), function.get("description"), function.get("parameters")
    else:
        name, description, parameters = entry.get("name"), entry.get("description"), entry.get("inputSchema")
    tool = {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}
    if domain:
        tool["x-domain"] = domain
    if category:
        tool["x-category"] = category
    validate_tool(tool, where)
    return tool


def validate_tool(tool: Tool, where: str = "tool") -> None:
    """Raise ToolSpecError (naming `where` and the tool) unless `tool` is usable; see the module docstring."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict):
        raise ToolSpecError(f"{where}: expected {{'type': 'function', 'function': {{...}}}}, got {tool!r}")
    name = function.get("name")
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ToolSpecError(f"{where}: tool name {name!r} must match {NAME_PATTERN.pattern}")
    where = f"{where}: tool {name!r}"
    if not isinstance(function.get("description"), str) or not function["description"].strip():
        raise ToolSpecError(f"{where}: needs a non-empty description")
    schema = function.get("parameters")
    if not isinstance(schema, dict):
        raise ToolSpecError(f"{where}: parameters (MCP inputSchema) must be a JSON Schema object, got {schema!r}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ToolSpecError(f"{where}: invalid JSON Schema at {path}: {e.message}") from None
    if schema.get("type") != "object":
        raise ToolSpecError(f"{where}: the arguments schema must have \"type\": \"object\", got {schema.get('type')!r}")
    props = schema.get("properties", {})
    missing = [r for r in schema.get("required", []) if r not in props]
    if missing:
        raise ToolSpecError(f"{where}: required {missing} not among the properties {sorted(props)}")


def load_tool_file(path: str | os.PathLike) -> list[Tool]:
    """One tool file (module docstring) -> its tools, validated; errors name the file and the tool."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ToolSpecError(f"{path}: cannot read a JSON tool file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tools"), list):
        raise ToolSpecError(f"{path}: expected {{\"category\", \"domain\", \"tools\": [...]}}")
    domain, category = str(data.get("domain", path.stem)), str(data.get("category", ""))
    tools = [to_openai(entry, domain=domain, category=category, where=f"{path} [tools {k}]")
             for k, entry in enumerate(data["tools"])]
    names = [tool_name(t) for t in tools]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ToolSpecError(f"{path}: tool names {repeated} appear more than once")
    return tools


def load_tools(paths: Sequence[str | os.PathLike] | str | os.PathLike = TOOLS_DIR) -> list[Tool]:
    """Tools of every *.json file named by `paths` (files, or directories searched recursively, sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        found = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        if not found or not found[0].exists():
            raise ToolSpecError(f"{p}: no tool files (*.json) there")
        files.extend(found)
    return [tool for f in files for tool in load_tool_file(f)]


def normalised_schema(schema: Any) -> Any:
    """The schema without documentation keys (description, title, examples, $comment), for comparison."""
    if isinstance(schema, dict):
        return {k: normalised_schema(v) for k, v in schema.items()
                if not (k in _DOC_KEYS and not isinstance(v, dict))}
    if isinstance(schema, list):
        return [normalised_schema(v) for v in schema]
    return schema


def tool_key(tool: Tool) -> str:
    """name + normalised parameters schema as canonical JSON: equal keys mean the same tool."""
    return json.dumps([tool_name(tool), normalised_schema(tool["function"]["parameters"])], sort_keys=True)


def deduplicate(tools: Iterable[Tool]) -> tuple[list[Tool], list[tuple[Tool, str]]]:
    """-> (kept, dropped): the first of each tool_key is kept; a later tool with the same key is dropped as
    "duplicate of ..."; one with a kept name but a different schema is dropped as "name conflict" (a toolset
    cannot hold two tools of one name)."""
    kept: list[Tool] = []
    dropped: list[tuple[Tool, str]] = []
    keys: set[str] = set()
    names: dict[str, Tool] = {}
    for tool in tools:
        key, name = tool_key(tool), tool_name(tool)
        if key in keys:
            dropped.append((tool, f"duplicate of {name!r} ({domain_of(names[name]) or 'no domain'})"))
        elif name in names:
            dropped.append((tool, f"name conflict: {name!r} already defined with another schema "
                                  f"({domain_of(names[name]) or 'no domain'})"))
        else:
            keys.add(key)
            names[name] = tool
            kept.append(tool)
    return kept, dropped


def tools_by_domain(tools: Iterable[Tool]) -> dict[str, list[Tool]]:
    out: dict[str, list[Tool]] = {}
    for tool in tools:
        out.setdefault(domain_of(tool), []).append(tool)
    return out
