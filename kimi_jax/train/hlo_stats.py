"""Statistics of a compiled (SPMD-partitioned) XLA program: memory, FLOPs, HBM traffic and collectives (the
roofline estimate from them: kimi_jax.train.chips; the HLO text parsing: kimi_jax.train.hlo_parse).

All numbers are per device: `compiled.as_text()` is the partitioned per-device HLO module, and
`memory_analysis()` / `cost_analysis()` describe that module. cost_analysis() counts the body of a while loop
once (not times its trip count: checked on XLA:TPU and XLA:CPU), so for a step made of layer and microbatch
scans its FLOPs and bytes are far below one step's; `dot_flops` (2 x multiply-adds of every dot, ragged dot and
convolution, loop trip counts multiplied in) and `hbm_bytes` (operand + result bytes of unfused instructions,
likewise) are the per-step figures. XLA:GPU's compile-only path reports no cost_analysis at all.

Collectives are read from the HLO text. An instruction inside a while loop (the layer scans, the microbatch
scan) counts trip-count times: the trip count is XLA's `known_trip_count` backend annotation where present
(XLA:CPU/GPU), otherwise read from the loop condition (`i < N` with the induction variable's initial value;
XLA:TPU replaces the annotation with its own backend config). Nested loops multiply. Instructions in fused,
called and async-wrapped computations (async-start; XLA:TPU's SparseCore offloads, call-start) count once per
call; both branches of a conditional count (an upper bound). Per collective two sizes are kept:

  bytes       the buffer the collective works on, per device: all-gather its (gathered) result, reduce-scatter
              its (unscattered) operand, all-reduce / all-to-all / collective-permute their operand,
              ragged-all-to-all the smaller of its input and output buffers (the rows actually sent are data
              dependent: this is what a device sends and receives when the load is balanced and the buffers
              are full; a dropless receive buffer sized for the worst case is larger);
  wire_bytes  what one device sends with a bandwidth-optimal algorithm over a group of n devices: all-gather and
              reduce-scatter bytes * (n-1)/n, all-reduce 2 * bytes * (n-1)/n, (ragged-)all-to-all
              bytes * (n-1)/n, collective-permute bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from kimi_jax.train.hlo_parse import (Computation, Instruction, attr, called, group_info, parse_hlo, permute_pairs,
                                      shape_bytes, shape_dims, strip_layouts, trip_count)

COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                    "collective-permute", "collective-broadcast")


# ------------------------------------------------------------------------------------------- analysis

@dataclasses.dataclass
class CollectiveRecord:
    kind: str
    shape: str             # shape of the buffer that `bytes` measures (layouts stripped)
    bytes: float           # per execution, per device
    wire_bytes: float      # per execution, per device
    group_size: int | None
    count: float           # executions per step (loop trip counts multiplied in)
    groups: str            # the replica_groups / source_target_pairs text
    slow_network: bool | None = None   # crosses slices / hosts (DCN, InfiniBand); None: unknown
    name: str = ""
    computation: str = ""
    larger_buffer: float | None = None     # ragged-all-to-all: the larger of its input and output buffers


@dataclasses.dataclass
class HloStats:
    collectives: list[CollectiveRecord]
    dot_flops: float                 # 2 * multiply-adds of dot / ragged-dot / convolution, loops counted
    ragged_dot_flops: float          # of which ragged-dot kernels (XLA:TPU custom calls), on full buffers
    hbm_bytes: float                 # operand + result bytes of unfused instructions, loops counted (estimate)
    while_loops: list[dict]          # {"name", "trip_count", "source"}
    notes: list[str]

    def by_kind(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for c in self.collectives:
            d = out.setdefault(c.kind, {"count": 0.0, "bytes": 0.0, "wire_bytes": 0.0, "slow_wire_bytes": 0.0})
            d["count"] += c.count
            d["bytes"] += c.count * c.bytes
            d["wire_bytes"] += c.count * c.wire_bytes
            if c.slow_network:
                d["slow_wire_bytes"] += c.count * c.wire_bytes
        return out

    def total(self, key: str = "bytes") -> float:
        return sum(v[key] for v in self.by_kind().values())

    def ragged_fill(self) -> float | None:
        """How full the ragged exchange buffers are when the load is balanced: smaller / larger buffer of the
        ragged-all-to-alls (a dropless receive buffer is sized for every row landing on one device)."""
        pairs = [(c.count * c.bytes, c.count * c.larger_buffer) for c in self.collectives
                 if c.kind == "ragged-all-to-all" and c.larger_buffer]
        return sum(p[0] for p in pairs) / sum(p[1] for p in pairs) if pairs else None

    def compute_flops(self) -> float:
        """dot_flops with the ragged-dot kernels counted at the ragged exchange's balanced fill (their rows are
        the received rows); the figure the roofline estimate uses."""
        fill = self.ragged_fill()
        return self.dot_flops - self.ragged_dot_flops * (1 - fill) if fill is not None else self.dot_flops

    def top(self, n: int = 10) -> list[dict]:
        """The n largest collectives by per-step bytes; identical (kind, shape, group) ones merged."""
        merged: dict[tuple, dict] = {}
        for c in self.collectives:
            key = (c.kind, strip_layouts(c.shape), c.group_size, c.slow_network)
            d = merged.setdefault(key, {"kind": c.kind, "shape": strip_layouts(c.shape), "group_size": c.group_size,
                                        "slow_network": c.slow_network, "count": 0.0, "bytes_each": c.bytes,
                                        "bytes": 0.0, "wire_bytes": 0.0})
            d["count"] += c.count
            d["bytes"] += c.count * c.bytes
            d["wire_bytes"] += c.count * c.wire_bytes
        return sorted(merged.values(), key=lambda d: -d["bytes"])[:n]



def analyze_hlo(text: str, *, device_domain: list[int] | None = None, mesh_axis_domains=None) -> HloStats:
    """Collectives (with loop multiplicities), dot FLOPs and an HBM traffic estimate of a per-device HLO module.

    device_domain: optional, domain id (TPU slice, GPU host) of every device id of the module's device
    assignment; collectives whose group spans several domains are marked slow_network.
    mesh_axis_domains: optional callable(axes tuple) -> bool, for `replica_groups=mesh[...] {axes}` groups: True
    when groups over these mesh axes span several domains.
    """
    comps, header = parse_hlo(text)
    num_devices = header.get("num_partitions", 1) * header.get("replica_count", 1)
    defs = {i.name: i for c in comps.values() for i in c.instructions}
    entry = next((c for c in comps.values() if c.is_entry), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    notes, loops = [], []
    num_domains = len(set(device_domain)) if device_domain else 1
    if device_domain is not None and num_devices < len(device_domain):
        # XLA:TPU multi-slice: one module per slice; its replica groups stay inside the slice and the
        # cross-slice (DCN) collectives are megascale send/recv pairs
        notes.append(f"per-slice module ({num_devices} of {len(device_domain)} devices): cross-slice collectives "
                     f"are the megascale sends, counted as DCN collectives over {num_domains} slices")
        device_domain, mesh_axis_domains = [0] * num_devices, (lambda axes: False)
    memo: dict[tuple[str, bool], tuple[dict, list[float]]] = {}

    def visit(name: str, fused: bool, stack: tuple = ()) -> tuple[dict, list[float]]:
        """({record id: [record, count]}, [dot flops, of which ragged-dot kernels, HBM bytes]) of one execution
        of computation `name`, callees included. fused: inside a fusion (its memory traffic is the fusion
        instruction's)."""
        if (name, fused) in memo:
            return memo[(name, fused)]
        if name in stack:
            raise ValueError(f"recursive HLO call graph at {name}")
        comp = comps[name]
        counts: dict[int, list] = {}
        totals = [0.0, 0.0, 0.0]
        for instr in comp.instructions:
            ragged = _ragged_kernel_flops(instr, defs)
            totals[0] += _dot_flops(instr, defs) + ragged
            totals[1] += ragged
            if not fused:
                totals[2] += _hbm_bytes(instr, defs, comps)
            kind = _collective_kind(instr.opcode)
            if kind is not None:
                r = _record(kind, instr, defs, num_devices, device_domain, mesh_axis_domains, comp.name)
                counts[id(r)] = [r, 1.0]
            elif instr.opcode == "send" and "_xla_megascale_transfer_type" in instr.attrs:
                r = _megascale_record(instr, defs, num_domains, comp.name)
                counts[id(r)] = [r, 1.0]
            if instr.opcode.endswith("-update") or instr.opcode.endswith("-done"):
                continue       # the same wrapped computation as its async-start / call-start
            factor_for = {}
            if instr.opcode == "while":
                trip, source = trip_count(instr, comps, defs)
                loops.append({"name": instr.name, "computation": name, "trip_count": trip, "source": source})
                if trip is None:
                    notes.append(f"while {instr.name}: trip count unknown, counted once")
                    trip = 1
                factor_for = {"body": trip, "condition": trip + 1}
            for role, callee in called(instr):
                if callee not in comps or (role == "to_apply" and instr.opcode != "call-start"):
                    continue           # reducers of reduce / all-reduce / sort / scatter: no collectives or dots
                factor = factor_for.get(role, 1)
                if role in ("branch", "true_computation", "false_computation"):
                    note = f"conditional {instr.name}: every branch counted (upper bound)"
                    if note not in notes:
                        notes.append(note)
                sub, sub_totals = visit(callee, fused or instr.opcode == "fusion", stack + (name,))
                totals = [t + factor * u for t, u in zip(totals, sub_totals)]
                for key, (r, c) in sub.items():
                    counts.setdefault(key, [r, 0.0])[1] += factor * c
        memo[(name, fused)] = (counts, totals)
        return memo[(name, fused)]

    counts, (flops, ragged, hbm) = visit(entry.name, False)
    records = [dataclasses.replace(r, count=c) for r, c in counts.values()]
    if ragged:
        notes.append("ragged-dot kernels (grouped matmuls of the experts) counted over their whole row buffers: "
                     "an upper bound, the rows actually used are data dependent")
    kernels = sorted({re.sub(r"\d+", "#", (re.search(r'op_name="([^"]*)"', i.attrs) or [None, i.name])[1])
                      for c in comps.values() for i in c.instructions
                      if i.opcode == "custom-call" and not _ragged_kernel_flops(i, defs)
                      and re.search(r'custom_call_target="(tpu_custom_call|mosaic_gpu[^"]*|__gpu\$xla\.gpu\.triton)"',
                                    i.attrs)
                      and "ragged-dot-metadata" not in i.attrs})
    if kernels:
        notes.append(f"{len(kernels)} custom kernels (Pallas / Mosaic / Triton) are not in the dot FLOPs, e.g. "
                     + ", ".join(k.rsplit("/", 2)[-2] if "/" in k else k for k in kernels[:3]))
    return HloStats(records, flops, ragged, hbm, loops, notes)


_NO_TRAFFIC = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "async-start", "async-update", "async-done",
               "call-start", "call-update", "call-done",
               "copy-start", "copy-done", "opt-barrier", "add-dependency", "domain", "iota"}


def _hbm_bytes(instr: Instruction, defs, comps) -> float:
    """Operand + result bytes of an unfused instruction (what HloCostAnalysis calls bytes accessed, roughly).
    Slices read only what they return; in-place updates (dynamic-update-slice, scatter, fusions rooted in one)
    move only the update; a fusion operand that the fusion only slices counts as the slices' sizes."""
    if (instr.opcode in _NO_TRAFFIC or instr.opcode.endswith("-done") or instr.opcode.endswith("-update")
            or instr.opcode == "call-start"):
        return 0.0             # async wrappers (XLA:TPU SparseCore offloads: call-start): their callee counts
    operand_bytes = [shape_bytes(defs[o].shape) if o in defs else 0.0 for o in instr.operands]
    result = shape_bytes(instr.shape)
    if instr.opcode in ("dynamic-slice", "slice", "gather"):
        return 2 * result
    if instr.opcode in ("dynamic-update-slice", "scatter"):
        update = operand_bytes[1] if instr.opcode == "dynamic-update-slice" else operand_bytes[-1]
        return 2 * update
    if instr.opcode == "fusion":
        callee = comps.get((attr(instr.attrs, "calls") or "").lstrip("%"))
        if callee is not None:
            return _fusion_bytes(callee, operand_bytes, result)
    return sum(operand_bytes) + result


def _fusion_bytes(comp: Computation, operand_bytes: list[float], result: float) -> float:
    local = {i.name: i for i in comp.instructions}
    users: dict[str, list[Instruction]] = {}
    for i in comp.instructions:
        for o in i.operands:
            users.setdefault(o, []).append(i)

    def through_bitcasts(name):
        out = []
        for u in users.get(name, []):
            if u.opcode in ("bitcast", "reshape") and u.operands and u.operands[0] == name:
                out += through_bitcasts(u.name)
            else:
                out.append((name, u))
        return out

    total = 0.0
    root = local.get(comp.root) if comp.root else None
    roots = [local.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    for i in comp.instructions:
        if i.opcode != "parameter":
            continue
        try:
            k = int(i.operands[0])
        except (IndexError, ValueError):
            continue
        full = operand_bytes[k] if k < len(operand_bytes) else shape_bytes(i.shape)
        uses = through_bitcasts(i.name)
        if uses and all(u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == src
                        for src, u in uses):
            total += min(full, sum(shape_bytes(u.shape) for _, u in uses))
        elif uses and all(u.opcode in ("dynamic-update-slice", "scatter") and u.operands[0] == src
                          for src, u in uses):
            pass                                   # the buffer updated in place: only the update moves
        else:
            total += full
    out = 0.0
    for r in roots:
        if r is None:
            continue
        if r.opcode == "dynamic-update-slice" and len(r.operands) > 1 and r.operands[1] in local:
            out += shape_bytes(local[r.operands[1]].shape)
        elif r.opcode == "scatter" and r.operands and r.operands[-1] in local:
            out += shape_bytes(local[r.operands[-1]].shape)
        else:
            out += shape_bytes(r.shape)
    return total + (out if root is not None else result)


def _collective_kind(opcode: str) -> str | None:
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVE_KINDS else None


def _record(kind, instr: Instruction, defs, num_devices, device_domain, mesh_axis_domains, comp_name):
    operand_shapes = [defs[o].shape if o in defs else "" for o in instr.operands]
    size, groups, mesh_group = group_info(instr, num_devices)
    n = size or 1
    if kind == "all-gather":
        in_bytes = sum(shape_bytes(s) for s in operand_shapes)
        if instr.opcode.endswith("-start") or size is None:
            result = instr.shape
            nbytes = shape_bytes(result) - (in_bytes if instr.opcode.endswith("-start") else 0)
            shape = result
        else:
            nbytes, shape = shape_bytes(instr.shape), instr.shape
        if size is not None and in_bytes:
            nbytes = in_bytes * n
        wire = nbytes * (n - 1) / n
    elif kind == "ragged-all-to-all":
        buffers = sorted((shape_bytes(sh), sh) for sh in operand_shapes[:2]) or [(shape_bytes(instr.shape),
                                                                                   instr.shape)]
        nbytes, shape = buffers[0]
        larger = buffers[-1][0]
        wire = nbytes * (n - 1) / n
    elif kind == "collective-permute":
        shape = operand_shapes[0] if operand_shapes else instr.shape
        nbytes = shape_bytes(shape)
        wire = nbytes
    else:
        shape = ", ".join(operand_shapes) if len(operand_shapes) > 1 else (operand_shapes[0] if operand_shapes
                                                                           else instr.shape)
        nbytes = sum(shape_bytes(s) for s in operand_shapes) or shape_bytes(instr.shape)
        wire = nbytes * (n - 1) / n * (2 if kind == "all-reduce" else 1)
    slow = None
    if kind == "collective-permute":
        pairs = permute_pairs(instr)
        if device_domain is not None and pairs:
            slow = any(device_domain[a] != device_domain[b] for a, b in pairs
                       if a < len(device_domain) and b < len(device_domain))
        groups_text = attr(instr.attrs, "source_target_pairs") or ""
    else:
        groups_text = attr(instr.attrs, "replica_groups") or "{}"
        if mesh_group is not None and mesh_axis_domains is not None:
            slow = bool(mesh_axis_domains(mesh_group[1]))
        elif groups is not None and device_domain is not None:
            slow = any(len({device_domain[d] for d in g if d < len(device_domain)}) > 1 for g in groups)
        elif device_domain is not None and len(set(device_domain)) == 1:
            slow = False
    return CollectiveRecord(kind, strip_layouts(shape), nbytes, wire, size, 1.0, groups_text, slow,
                            instr.name, comp_name, larger if kind == "ragged-all-to-all" else None)


def _megascale_record(instr: Instruction, defs, num_slices: int, comp_name: str) -> CollectiveRecord:
    """A cross-slice collective of XLA:TPU multi-slice (a send to the megascale runtime): the buffer is this
    device's part (the in-slice reduce-scatter already applied)."""
    transfer = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', instr.attrs).group(1)
    kind = transfer.lower().replace("_", "-")
    shape = defs[instr.operands[0]].shape if instr.operands and instr.operands[0] in defs else instr.shape
    buffer = shape_bytes(shape)
    n = max(num_slices, 1)
    if kind == "all-gather":
        nbytes, wire = buffer * n, buffer * (n - 1)
    elif kind == "all-reduce":
        nbytes, wire = buffer, 2 * buffer * (n - 1) / n
    else:
        nbytes, wire = buffer, buffer * (n - 1) / n
    target = re.search(r'_xla_megascale_target="([^"]*)"', instr.attrs)
    return CollectiveRecord(kind, strip_layouts(shape), nbytes, wire, n, 1.0,
                            "megascale " + (target.group(1) if target else ""), True, instr.name, comp_name)


def _ragged_kernel_flops(instr: Instruction, defs) -> float:
    """2 * multiply-adds of a ragged dot that XLA:TPU turned into a kernel (a custom call whose op_name ends
    in ragged-dot, or with a ragged_dot_tiling): out [M, N] = x [M, K] . w [G, K, N], or the weight gradient
    out [G, A, B] from x [M, A], y [M, B]. Counted over the whole buffers (every row of M)."""
    if instr.opcode != "custom-call" or not ("ragged_dot_tiling" in instr.attrs
                                             or re.search(r'op_name="[^"]*ragged-dot-(?!metadata)', instr.attrs)):
        return 0.0
    out = shape_dims(instr.shape)
    data = [shape_dims(defs[o].shape) for o in instr.operands if o in defs and len(shape_dims(defs[o].shape)) >= 2]
    if len(data) < 2:
        return 0.0
    if len(out) == 2:
        x = next((d for d in data if len(d) == 2 and d[0] == out[0]), None)
        return 2.0 * out[0] * x[1] * out[1] if x else 0.0
    if len(out) == 3:
        rows = [d for d in data if len(d) == 2]
        return 2.0 * rows[0][0] * out[1] * out[2] if len(rows) >= 2 else 0.0
    return 0.0


def _dot_flops(instr: Instruction, defs) -> float:
    if instr.opcode in ("dot", "ragged-dot"):
        out = math.prod(shape_dims(instr.shape))
        lhs = defs.get(instr.operands[0]) if instr.operands else None
        if lhs is None:
            return 0.0
        dims = shape_dims(lhs.shape)
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
        default = [len(dims) - 1] if instr.opcode == "ragged-dot" else []    # ragged dot: the last lhs dim
        contract = [int(d) for d in m.group(1).split(",") if d] if m else default
        return 2.0 * out * math.prod(dims[d] for d in contract)
    if instr.opcode == "convolution":
        # XLA:TPU writes batched matmuls as convolutions whose batch dims are spatial dims with window size B,
        # lhs_dilate B (one real tap per window): taps per spatial dim = min(ceil(size / lhs_dilate), input size)
        out = math.prod(shape_dims(instr.shape))
        if len(instr.operands) < 2 or instr.operands[0] not in defs or instr.operands[1] not in defs:
            return 0.0
        m = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->", instr.attrs)
        if not m:
            return 0.0
        lhs_labels, rhs_labels = m.group(1), m.group(2)
        ldims, kdims = shape_dims(defs[instr.operands[0]].shape), shape_dims(defs[instr.operands[1]].shape)
        if len(lhs_labels) != len(ldims) or len(rhs_labels) != len(kdims):
            return 0.0
        window = attr(instr.attrs, "window") or ""
        nsp = sum(c.isdigit() for c in rhs_labels)
        size = _window_field(window, "size", nsp)
        dilate = _window_field(window, "lhs_dilate", nsp)
        taps = 1
        for k in range(nsp):
            taps *= min(-(-size[k] // dilate[k]), ldims[lhs_labels.index(str(k))])
        return 2.0 * out * kdims[rhs_labels.index("i")] * taps
    return 0.0


def _window_field(window: str, key: str, n: int) -> list[int]:
    m = re.search(r"(?:^|[\s{])" + key + r"=([\dx]+)", window)
    return [int(v) for v in m.group(1).split("x")] if m else [1] * n


# ------------------------------------------------------------------------------------------- memory / cost

def memory_stats(compiled) -> dict[str, float]:
    """Per-device bytes from compiled.memory_analysis(); total = arguments + outputs + temps - aliases."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
            "host_temp_size_in_bytes", "host_alias_size_in_bytes")
    out = {k.replace("_size_in_bytes", ""): float(getattr(m, k, 0) or 0) for k in keys}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def cost_stats(compiled) -> dict[str, float]:
    """flops, bytes accessed (and transcendentals, optimal_seconds where reported) from cost_analysis(),
    per device, while-loop bodies counted once; {} where the backend reports none."""
    c = compiled.cost_analysis()
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    c = c or {}
    out = {}
    for k in ("flops", "bytes accessed", "transcendentals", "optimal_seconds"):
        if k in c:
            out[k.replace(" ", "_")] = float(c[k])
    return out



def to_json(obj) -> str:
    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if hasattr(o, "item"):
            return o.item()
        return str(o)
    return json.dumps(obj, indent=1, default=default)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"

