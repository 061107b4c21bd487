"""Tool specs: the shipped files load and validate; bad schemas fail naming the file and the tool; dedup;
hierarchical evolution through a backend keeps valid tools and rejects the rest with a reason."""

import json

import pytest

from kimi_jax.agentic import ScriptedBackend, ToolSpecError, deduplicate, load_tool_file, load_tools
from kimi_jax.agentic.evolve import evolve_tools, parse_json_array, write_tool_file
from kimi_jax.agentic.tools import domain_of, tool_key, tool_name

GOOD = {"name": "get_rate", "description": "Exchange rate between two currencies.",
        "inputSchema": {"type": "object", "properties": {"base": {"type": "string"}, "quote": {"type": "string"}},
                        "required": ["base", "quote"]}}


def _file(tmp_path, tools, name="fx.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"category": "finance", "domain": "fx", "tools": tools}))
    return path


def test_shipped_tools_load_across_domains():
    tools = load_tools()
    domains = {domain_of(t) for t in tools}
    assert domains == {"accounts and orders", "calendar", "file system", "weather", "notes", "flights"}
    assert len(tools) == 22 and len({tool_name(t) for t in tools}) == 22
    assert deduplicate(tools)[1] == []
    cancel = next(t for t in tools if tool_name(t) == "cancel_order")
    assert cancel["type"] == "function" and cancel["function"]["parameters"]["required"] == ["order_id", "reason"]


@pytest.mark.parametrize("tool, message", [
    ({**GOOD, "inputSchema": {"type": "objekt"}}, "invalid JSON Schema at type"),
    ({**GOOD, "inputSchema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}},
     "invalid JSON Schema at properties/n/minimum"),
    ({**GOOD, "inputSchema": {"type": "array"}}, "must have \"type\": \"object\""),
    ({**GOOD, "inputSchema": {"type": "object", "properties": {}, "required": ["base"]}}, "required ['base'] not"),
    ({**GOOD, "name": "get rate"}, "tool name 'get rate' must match"),
    ({**GOOD, "description": " "}, "needs a non-empty description"),
    ({k: v for k, v in GOOD.items() if k != "inputSchema"}, "must be a JSON Schema object"),
])
def test_bad_schemas_name_the_file_and_the_tool(tmp_path, tool, message):
    path = _file(tmp_path, [GOOD | {"name": "ok_tool"}, tool])
    with pytest.raises(ToolSpecError, match="must match" if "must match" in message else "tool 'get_rate'") as e:
        load_tool_file(path)
    assert str(path) in str(e.value) and "[tools 1]" in str(e.value) and message in str(e.value)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ToolSpecError, match="bad.json: cannot read a JSON tool file"):
        load_tool_file(bad)
    with pytest.raises(ToolSpecError, match=r"appear more than once"):
        load_tool_file(_file(tmp_path, [GOOD, GOOD]))
    with pytest.raises(ToolSpecError, match="no tool files"):
        load_tools(tmp_path / "missing")


def test_openai_style_entries_are_accepted(tmp_path):
    entry = {"type": "function", "function": {"name": "get_rate", "description": GOOD["description"],
                                              "parameters": GOOD["inputSchema"]}}
    [mcp] = load_tool_file(_file(tmp_path, [GOOD], "a.json"))
    [oai] = load_tool_file(_file(tmp_path, [entry], "b.json"))
    assert mcp == oai and mcp["x-category"] == "finance" and mcp["x-domain"] == "fx"


def test_deduplicate_by_name_and_normalised_schema(tmp_path):
    [a] = load_tool_file(_file(tmp_path, [GOOD]))
    reworded = json.loads(json.dumps(a))
    reworded["function"]["description"] = "Another wording."
    reworded["function"]["parameters"]["properties"]["base"]["description"] = "ISO code"
    other_schema = json.loads(json.dumps(a))
    other_schema["function"]["parameters"]["required"] = ["base"]
    renamed = json.loads(json.dumps(a))
    renamed["function"]["name"] = "get_fx_rate"
    assert tool_key(a) == tool_key(reworded) != tool_key(other_schema)
    kept, dropped = deduplicate([a, reworded, other_schema, renamed])
    assert kept == [a, renamed]
    assert [why.split(":")[0].split(" of")[0] for _, why in dropped] == ["duplicate", "name conflict"]


def _evolver(messages, tools):
    prompt = messages[-1]["content"]
    if "application domains" in prompt:
        return 'Here you go:\n[{"domain": "budgeting", "description": "x"}, {"domain": "Budgeting"}, {"nope": 1}]'
    return json.dumps([GOOD, GOOD | {"description": "Same tool, other words."},
                       GOOD | {"name": "set_budget", "inputSchema": {"type": "object", "required": ["amount"]}},
                       GOOD | {"name": "add_expense", "inputSchema": {
                           "type": "object", "properties": {"amount": {"type": "number", "exclusiveMinimum": 0}},
                           "required": ["amount"]}}])


def test_evolution_keeps_valid_tools_and_rejects_the_rest_with_reasons(tmp_path):
    backend = ScriptedBackend(_evolver)
    result = evolve_tools(backend, ["finance"], domains_per_category=3, tools_per_domain=4)
    assert result.domains == [("finance", "budgeting")]
    assert [tool_name(t) for t in result.tools] == ["get_rate", "add_expense"]
    assert all(t["x-category"] == "finance" and t["x-domain"] == "budgeting" for t in result.tools)
    reasons = [why for _, _, why in result.rejected]
    assert reasons[0].startswith("duplicate of 'get_rate'")
    assert "tool 'set_budget': required ['amount'] not among the properties" in reasons[1]
    assert reasons[2] == "domain 'Budgeting' was already evolved"
    assert reasons[3] == "a domain needs a non-empty \"domain\" string"
    assert len(backend.calls) == 2                       # one domain prompt, one tool prompt
    write_tool_file(tmp_path / "budgeting.json", "finance", "budgeting", result.tools)
    assert load_tools(tmp_path) == result.tools


def test_evolution_rejects_unparseable_replies():
    result = evolve_tools(ScriptedBackend(lambda m, t: "I cannot help with that."), ["travel"])
    assert result.tools == [] and result.rejected == [("category 'travel'", None, "the reply holds no JSON array")]
    assert parse_json_array("[1, 2,]")[1].startswith("the reply's JSON does not parse")


def test_example_arguments_are_valid_for_their_schema():
    import random

    import jsonschema

    from kimi_jax.agentic.examples import example_arguments
    rng = random.Random(0)
    drawn = {tool_name(t): example_arguments(t["function"]["parameters"], rng) for t in load_tools()}
    for tool in load_tools():
        if drawn[tool_name(tool)] is not None:
            jsonschema.validate(drawn[tool_name(tool)], tool["function"]["parameters"])
    assert drawn["get_forecast"]["days"] in range(1, 8) and set(drawn["get_forecast"]) >= {"city", "days"}
    assert drawn["get_order"]["order_id"] >= 1
    assert drawn["list_events"] is None                          # a date pattern cannot be drawn
    assert example_arguments({"type": "object", "properties": {"n": {"type": "integer", "maximum": -5,
                                                                       "minimum": -9}}, "required": ["n"]},
                             rng)["n"] in range(-9, -4)
