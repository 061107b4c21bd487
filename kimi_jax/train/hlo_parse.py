"""Parsing of per-device XLA HLO module text (`compiled.as_text()`): instructions and computations, shapes and
their bytes, instruction attributes, replica groups, and the trip counts of while loops."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

_DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
    "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "tf32": 4,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")


# ----------------------------------------------------------------------------------------------- HLO parsing

@dataclasses.dataclass
class Instruction:
    name: str
    shape: str            # result shape text, layouts included (a tuple shape keeps its parentheses)
    opcode: str
    operands: list[str]   # operand instruction names (without %)
    attrs: str            # the rest of the line after the operand list


@dataclasses.dataclass
class Computation:
    name: str
    is_entry: bool
    instructions: list[Instruction]
    root: str | None = None


def _balanced(text: str, start: int, open_ch: str = "(", close_ch: str = ")") -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} in HLO line: {text[:200]}")


def _split_top(text: str) -> list[str]:
    """Split on commas outside (), [], {}."""
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts]


_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*")


def _parse_instruction(line: str) -> tuple[Instruction, bool] | None:
    m = _INSTR.match(line)
    if not m:
        return None
    is_root, name = bool(m.group(1)), m.group(2)
    i = m.end()
    if line[i] == "(":
        j = _balanced(line, i)
    else:
        j = line.index(" ", i)
    shape = line[i:j]
    rest = line[j:].lstrip()
    k = rest.find("(")
    if k < 0:
        return None
    opcode = rest[:k].strip()
    end = _balanced(rest, k)
    operands = []
    for op in _split_top(rest[k + 1:end - 1]):
        refs = re.findall(r"%([^\s,()]+)", op)
        if refs:
            operands.append(refs[-1])
        elif op and not re.match(r"^[a-z0-9]+\[", op):      # constants print their literal; keep the text
            operands.append(op)
    return Instruction(name, shape, opcode, operands, rest[end:]), is_root


def parse_hlo(text: str) -> tuple[dict[str, Computation], dict[str, Any]]:
    """HLO module text -> ({computation name: Computation}, module header attributes)."""
    comps: dict[str, Computation] = {}
    header: dict[str, Any] = {}
    current: Computation | None = None
    for line in text.splitlines():
        if line.startswith("HloModule"):
            m = re.search(r"num_partitions=(\d+)", line)
            header["num_partitions"] = int(m.group(1)) if m else 1
            m = re.search(r"replica_count=(\d+)", line)
            header["replica_count"] = int(m.group(1)) if m else 1
            continue
        stripped = line.strip()
        if current is None:
            m = re.match(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$", line)
            if m and not line.startswith(" "):
                current = Computation(m.group(2), bool(m.group(1)), [])
            continue
        if stripped == "}":
            comps[current.name] = current
            current = None
            continue
        parsed = _parse_instruction(line)
        if parsed is not None:
            instr, is_root = parsed
            current.instructions.append(instr)
            if is_root:
                current.root = instr.name
    return comps, header


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape (a tuple counts all its elements); layouts and tilings are ignored."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(strip_layouts(shape)):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d.replace("<=", "").strip())
        total += n * _DTYPE_BYTES[dtype]
    return total


def shape_dims(shape: str) -> tuple[int, ...]:
    m = _ARRAY.search(strip_layouts(shape))
    if not m:
        return ()
    return tuple(int(d.replace("<=", "").strip()) for d in m.group(2).split(",") if d.strip())


def strip_layouts(shape: str) -> str:
    out, depth = [], 0
    for c in shape:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0:
            out.append(c)
    return "".join(out)


def attr(attrs: str, key: str) -> str | None:
    """The value text of `key=` in an attribute string (balanced braces / brackets kept)."""
    m = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=", attrs)
    if not m:
        return None
    i = m.end()
    if i < len(attrs) and attrs[i] in "{[":
        close = "}" if attrs[i] == "{" else "]"
        j = _balanced(attrs, i, attrs[i], close)
        # iota replica groups: [2,4]<=[8] or [2,4]<=[4,2]T(1,0); mesh groups: mesh['x'=4] {'x'}
        tail = re.match(r"<=\[[^\]]*\](T\([^)]*\))?", attrs[j:])
        if tail:
            j += tail.end()
        return attrs[i:j]
    m2 = re.match(r"mesh\[[^\]]*\]\s*\{[^}]*\}", attrs[i:])
    if m2:
        return m2.group(0)
    m2 = re.match(r"[^,\s]+", attrs[i:])
    return m2.group(0) if m2 else ""


def called(instr: Instruction) -> list[tuple[str, str]]:
    """(role, computation name) pairs that this instruction calls."""
    out = []
    for key in ("calls", "body", "condition", "to_apply", "true_computation", "false_computation"):
        v = attr(instr.attrs, key)
        if v:
            for name in re.findall(r"%?([^\s,{}%]+)", v):
                out.append((key, name))
    v = attr(instr.attrs, "branch_computations")
    if v:
        out += [("branch", n) for n in re.findall(r"%([^\s,{}]+)", v)]
    return out


# ---------------------------------------------------------------------------------------- replica groups

def group_info(instr: Instruction, num_devices: int) -> tuple[int | None, list[list[int]] | None, tuple | None]:
    """(group size, explicit groups of device ids or None, (mesh axis sizes dict, group axes) or None)."""
    rg = attr(instr.attrs, "replica_groups")
    if rg is None or rg in ("{}", ""):
        return num_devices, [list(range(num_devices))], None
    if rg.startswith("mesh["):
        m = re.match(r"mesh\[([^\]]*)\]\s*\{([^}]*)\}", rg)
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))}
        axes = tuple(re.findall(r"'([^']+)'", m.group(2)))
        size = math.prod(sizes[a] for a in axes if a in sizes) if axes else 1
        return size, None, (sizes, axes)
    if rg.startswith("["):
        m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rg)
        if m:
            shape = [int(x) for x in m.group(1).split(",")]
            reshape = [int(x) for x in m.group(2).split(",")]
            perm = [int(x) for x in m.group(3).split(",")] if m.group(3) else None
            import numpy as np
            ids = np.arange(math.prod(reshape)).reshape(reshape)
            if perm:
                ids = ids.transpose(perm)
            ids = ids.reshape(shape[0], -1)
            return ids.shape[1], ids.tolist(), None
        return None, None, None
    groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", rg[1:-1])]
    groups = [g for g in groups if g]
    if not groups:
        return num_devices, [list(range(num_devices))], None
    return len(groups[0]), groups, None


def permute_pairs(instr: Instruction) -> list[tuple[int, int]]:
    v = attr(instr.attrs, "source_target_pairs") or ""
    return [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", v)]


# ----------------------------------------------------------------------------------------------- trip counts

def trip_count(instr: Instruction, comps: dict[str, Computation], defs: dict[str, Instruction]):
    """(trip count or None, how it was found) of a while instruction: XLA's known_trip_count, else the loop
    condition `counter < constant` (or <=, >, >=; possibly inside a fusion) with the counter's initial value
    from the while operand (a step of 1, as jax's scan and fori_loop count)."""
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', instr.attrs)
    if m:
        return int(m.group(1)), "known_trip_count"
    cond_name = attr(instr.attrs, "condition")
    cond = comps.get((cond_name or "").lstrip("%"))
    if cond is None or cond.root is None:
        return None, "unknown"
    local = {i.name: i for i in cond.instructions}
    root = local[cond.root]
    if root.opcode == "fusion":           # compare fused with its constant: look inside
        callee = comps.get((attr(root.attrs, "calls") or "").lstrip("%"))
        if callee is not None and callee.root is not None:
            inner = {i.name: i for i in callee.instructions}
            croot = inner[callee.root]
            if croot.opcode == "compare":
                resolved = []
                for op in croot.operands:
                    x = inner.get(op)
                    if x is not None and x.opcode == "parameter":
                        idx = int(x.operands[0]) if x.operands else 0
                        resolved.append(local.get(root.operands[idx]))
                    else:
                        resolved.append(x)
                return _compare_trip(croot, resolved, instr, defs, local)
        return None, "unknown"
    if root.opcode != "compare":
        return None, "unknown"
    return _compare_trip(root, [local.get(o) for o in root.operands], instr, defs, local)


def _constant_value(x: Instruction | None, table: dict[str, Instruction]) -> int | None:
    for _ in range(8):
        if x is None:
            return None
        if x.opcode == "constant":
            try:
                return int(x.operands[0]) if x.operands else None
            except ValueError:
                return None
        if x.opcode in ("copy", "bitcast", "convert", "reshape") and x.operands:
            x = table.get(x.operands[0])
            continue
        return None
    return None


def _compare_trip(cmp: Instruction, sides: list, while_instr: Instruction, defs, local):
    direction = (re.search(r"direction=(\w+)", cmp.attrs) or [None, None])[1]
    if len(sides) != 2:
        return None, "unknown"
    a, b = sides
    limit_b, limit_a = _constant_value(b, local), _constant_value(a, local)
    if limit_b is not None and a is not None and a.opcode == "get-tuple-element":
        index, limit, op = int(re.search(r"index=(\d+)", a.attrs).group(1)), limit_b, direction
    elif limit_a is not None and b is not None and b.opcode == "get-tuple-element":
        index, limit = int(re.search(r"index=(\d+)", b.attrs).group(1)), limit_a
        op = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    else:
        return None, "unknown"
    init, source = None, "condition"
    tup = defs.get(while_instr.operands[0]) if while_instr.operands else None
    if tup is not None and tup.opcode == "tuple" and index < len(tup.operands):
        init = _constant_value(defs.get(tup.operands[index]), defs)
    if init is None:
        init, source = 0, "condition (initial value not a constant: 0 assumed)"
    if op == "LT":
        return max(limit - init, 0), source
    if op == "LE":
        return max(limit - init + 1, 0), source
    return None, "unknown"
