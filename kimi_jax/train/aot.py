"""Ahead-of-time lowering and compilation of the real train step, for any device set (compile-only TPU / GPU
topologies included), and the statistics of the compiled program.

    lowered = lower_train_step(config, devices)        # jax.stages.Lowered; nothing is allocated
    compiled = lowered.compile()
    report = analyze(compiled, config, mesh)           # memory, FLOPs, collectives, roofline estimate

`devices` may be real devices or the compile-only devices of a topology description (`tpu_topology`,
`gpu_topology`): the mesh is config.mesh laid out over them (one axis -1 = the rest), or a multi-slice mesh
from `make_hybrid_mesh` (one mesh axis split across slices).
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from kimi_jax import sharding
from kimi_jax.train import hlo_stats, loop
from kimi_jax.train.chips import CHIPS, ChipSpec, roofline
from kimi_jax.train.metrics import flops_per_token
from kimi_jax.train.step import make_train_step

BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")


# ------------------------------------------------------------------------------------------------ the step

def abstract_batch(config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs, sharded as loop.train shards it."""
    shape = (int(config.data.global_batch_size), int(config.data.seq_len))
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), mesh))
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sharding)
            for k in BATCH_KEYS}


def lower_train_step(config, devices: Sequence | None = None, *, mesh: Mesh | None = None) -> jax.stages.Lowered:
    """The train step of a training config as loop.train builds it (config checked by loop.check_config,
    make_train_step with loop.step_kwargs(config), jit with donate_argnums=0), lowered for abstract (sharded
    ShapeDtypeStruct) state and global batch on a mesh of `devices` (config.mesh, -1 resolved against them;
    default jax.devices()). `mesh` overrides the mesh (e.g. a multi-slice one). Nothing is allocated."""
    if mesh is None:
        mesh = loop.make_mesh(config.mesh, devices)
    loop.check_config(config, mesh)
    cfg = loop.model_config(config.model)
    graphdef, state, tx, lr = loop.abstract_train_state(config, cfg, mesh)
    step = make_train_step(graphdef, cfg, tx, lr, **loop.step_kwargs(config))
    return jax.jit(step, donate_argnums=0).lower(state, abstract_batch(config, mesh))


# ------------------------------------------------------------------------------------------ meshes / devices

def resolve_mesh_sizes(mesh_cfg, n_devices: int) -> dict[str, int]:
    """config.mesh sizes with a -1 resolved against n_devices (as loop.make_mesh does)."""
    sizes = {k: int(mesh_cfg[k]) for k in sharding.MESH_AXES}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
    rest = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % rest:
            raise ValueError(f"config.mesh: {n_devices} devices are not divisible by {rest} ({sizes})")
        sizes[free[0]] = n_devices // rest
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"config.mesh {sizes} does not cover {n_devices} devices")
    return sizes


def make_hybrid_mesh(mesh_cfg, devices: Sequence, num_slices: int, dcn_axis: str = "data") -> Mesh:
    """A multi-slice mesh: config.mesh over all devices, with mesh axis `dcn_axis` split num_slices ways across
    slices (over DCN) and the rest of every axis inside each slice (ICI), laid out by
    mesh_utils.create_hybrid_device_mesh (devices need `slice_index`)."""
    from jax.experimental import mesh_utils
    sizes = resolve_mesh_sizes(mesh_cfg, len(devices))
    if dcn_axis not in sizes:
        raise ValueError(f"--dcn axis {dcn_axis!r} is not a mesh axis {tuple(sizes)}")
    if sizes[dcn_axis] % num_slices:
        raise ValueError(f"mesh axis {dcn_axis}={sizes[dcn_axis]} cannot be split across {num_slices} slices; "
                         f"set config.mesh.{dcn_axis} to a multiple of {num_slices}")
    ici = [sizes[a] // num_slices if a == dcn_axis else sizes[a] for a in sharding.MESH_AXES]
    dcn = [num_slices if a == dcn_axis else 1 for a in sharding.MESH_AXES]
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices), allow_split_physical_axes=True)
    return Mesh(array, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


# Slice names: v5p-N / v4-N count TensorCores (2 per chip, one megacore JAX device per chip), v5e-N / v6e-N chips.
def _tpu_3d(chips: int) -> tuple[int, int, int]:
    shapes = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
              8192: (16, 16, 32), 6144: (16, 16, 24), 8960: (16, 20, 28)}
    if chips not in shapes:
        raise ValueError(f"no 3D slice shape known for {chips} chips (known: {sorted(shapes)})")
    return shapes[chips]


def _tpu_2d(chips: int) -> tuple[int, int]:
    shapes = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
    if chips not in shapes:
        raise ValueError(f"no 2D slice shape known for {chips} chips (known: {sorted(shapes)})")
    return shapes[chips]


def parse_topology(name: str) -> dict[str, Any]:
    """'v5p-512' -> {"platform": "tpu", "family": "v5p", "chips": 256, "kwargs": get_topology_desc kwargs};
    'h100-256' -> {"platform": "cuda", "family": "h100", "gpus": 256, ...}. A raw '<gen>:AxBxC' name is passed
    through to libtpu."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if m:
        family, n = m.group(1), int(m.group(2))
        if family in ("v4", "v5p"):
            if n % 2:
                raise ValueError(f"{name}: {family} slices are named by TensorCores (2 per chip), use an even size")
            chips = n // 2
            dims = _tpu_3d(chips)
            kwargs = dict(topology_name=f"{'v5' if family == 'v5p' else 'v4'}:{'x'.join(map(str, dims))}",
                          chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1),
                          wrap=tuple(d % 4 == 0 for d in dims))      # wraparound links on full 4-chip dims
        else:
            chips = n
            dims = _tpu_2d(chips)
            kwargs = dict(topology_name=f"{family}:{'x'.join(map(str, dims))}")
        return {"platform": "tpu", "family": family, "chips": chips, "dims": dims, "kwargs": kwargs}
    m = re.fullmatch(r"(h100|h200|h800)-(\d+)", name)
    if m:
        gpus = int(m.group(2))
        if gpus % 8:
            raise ValueError(f"{name}: GPU clusters are nodes of 8 GPUs")
        return {"platform": "cuda", "family": m.group(1), "gpus": gpus, "nodes": gpus // 8}
    if ":" in name or "=" in name:
        return {"platform": "tpu", "family": None, "kwargs": dict(topology_name=name)}
    raise ValueError(f"unknown topology {name!r}: use v5p-512, v6e-64, v5e-16, v4-128, h100-256, ... or a libtpu "
                     f"name such as v5p:2x2x1")


def tpu_topology(name: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices of the named slice(s) (libtpu must be installed; no TPU needed).

    Sets ALLOW_MULTIPLE_LIBTPU_LOAD=1 unless set: compiling for a topology never opens a TPU, so the lock that
    keeps two processes off the same chips would only stop concurrent compiles."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"compiling for TPU topology {name!r} needs libtpu: pip install -r requirements-aot.txt "
                           f"(jax[tpu])") from e
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    spec = parse_topology(name)
    if spec["platform"] != "tpu":
        raise ValueError(f"{name} is not a TPU topology")
    kwargs = dict(spec["kwargs"])
    if num_slices > 1 or "chips_per_host_bounds" in kwargs:
        kwargs["num_slices"] = num_slices
    return list(topologies.get_topology_desc(platform="tpu", **kwargs).devices)


def _gpu_target(description: str, memory_bytes: int, bandwidth: float, clock_ghz: float) -> str:
    """GpuTargetConfigProto text (xla/stream_executor/device_description.proto) of a Hopper GPU (sm_90, 132 SMs):
    what the CUDA plugin's compile-only topology needs instead of a visible device."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: {clock_ghz}
  device_memory_size: {memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{description}"
"""


GPU_TARGET_CONFIGS = {
    "h100": _gpu_target("NVIDIA H100 80GB HBM3", 84978434048, 3.35232e12, 1.98),
    "h800": _gpu_target("NVIDIA H800", 84978434048, 3.35232e12, 1.98),
    "h200": _gpu_target("NVIDIA H200", 150754820096, 4.8e12, 1.98),
}


def gpu_topology(name: str) -> list:
    """Compile-only GPU devices of an `<chip>-<gpus>` cluster of 8-GPU nodes through the CUDA PJRT plugin
    (jax-cuda12-plugin and jax-cuda12-pjrt installed; no GPU or CUDA libraries needed)."""
    import importlib.util
    if not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        raise RuntimeError(f"compiling for GPU topology {name!r} needs the CUDA PJRT plugin: pip install -r "
                           f"requirements-aot.txt (jax-cuda12-plugin, jax-cuda12-pjrt)")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies
    spec = parse_topology(name)
    if spec["platform"] != "cuda":
        raise ValueError(f"{name} is not a GPU topology")
    return list(topologies.get_topology_desc(platform="cuda", topology_name="",
                                             target_config=GPU_TARGET_CONFIGS[spec["family"]],
                                             topology=f"1x{spec['nodes']}x8").devices)


def chip_for(devices: Sequence, family: str | None = None) -> ChipSpec | None:
    """The spec table entry for a topology family or the devices' device_kind."""
    if family in CHIPS:
        return CHIPS[family]
    kind = str(getattr(devices[0], "device_kind", "")).lower()
    for key, name in (("v5 lite", "v5e"), ("v5e", "v5e"), ("v6 lite", "v6e"), ("v6e", "v6e"), ("v5p", "v5p"),
                      ("tpu v5", "v5p"), ("tpu v4", "v4"), ("h100", "h100"), ("h200", "h200"), ("h800", "h800")):
        if key in kind:
            return CHIPS[name]
    return None


def device_domains(devices: Sequence) -> list[int]:
    """Per device (in the given order): its TPU slice or its GPU host (process); collectives whose groups span
    several domains go over DCN / InfiniBand instead of ICI / NVLink."""
    out = []
    for d in devices:
        if getattr(d, "platform", "") == "tpu":
            s = getattr(d, "slice_index", None)
            out.append(int(s) if s is not None else 0)
        elif getattr(d, "platform", "") in ("gpu", "cuda", "rocm"):
            out.append(int(getattr(d, "process_index", 0)))
        else:
            out.append(0)
    return out


def describe_mesh(mesh: Mesh) -> dict[str, Any]:
    """Axis sizes and, per axis, which physical coordinates vary along it (TPU: torus dims x, y, z, the core
    on the chip, the slice)."""
    devices = mesh.devices
    out = {"axes": dict(mesh.shape), "physical": {}}
    first = devices.flat[0]
    if not hasattr(first, "coords"):
        return out
    for ax, name in enumerate(mesh.axis_names):
        if devices.shape[ax] == 1:
            continue
        line = np.moveaxis(devices, ax, 0).reshape(devices.shape[ax], -1)[:, 0]
        spans = {}
        coords = np.array([list(d.coords) for d in line])
        for k, dim in enumerate("xyz"[:coords.shape[1]]):
            distinct = len(set(coords[:, k]))
            if distinct > 1:
                spans[dim] = distinct
        cores = len({getattr(d, "core_on_chip", 0) for d in line})
        if cores > 1:
            spans["core"] = cores
        slices = len({getattr(d, "slice_index", 0) for d in line})
        if slices > 1:
            spans["slice"] = slices
        out["physical"][name] = spans
    return out


def mesh_axis_domains(mesh: Mesh, domains_by_device: dict):
    """callable(axes) -> True when groups over these mesh axes span several domains."""
    dom = np.vectorize(lambda d: domains_by_device[d.id])(mesh.devices)

    def spans(axes):
        idx = [mesh.axis_names.index(a) for a in axes if a in mesh.axis_names]
        if not idx:
            return False
        rest = [i for i in range(dom.ndim) if i not in idx]
        groups = np.transpose(dom, rest + idx).reshape(-1, math.prod(dom.shape[i] for i in idx))
        return bool(np.any(groups != groups[:, :1]))
    return spans


# ------------------------------------------------------------------------------------------------ analysis

def analyze(compiled, config, mesh: Mesh, *, chip: ChipSpec | None = None,
            hlo_text: str | None = None) -> dict[str, Any]:
    """Per-device statistics of a compiled train step: memory (vs the chip's HBM), FLOPs (cost_analysis and
    counted from the HLO dots; model FLOPs from kimi_jax.train.metrics), HBM traffic, collectives by kind, the
    largest collectives, the while loops and their trip counts, and a roofline step-time ESTIMATE."""
    devices = list(mesh.devices.flat)
    n = len(devices)
    chip = chip or chip_for(devices)
    cfg = loop.model_config(config.model)
    seq, batch = int(config.data.seq_len), int(config.data.global_batch_size)
    model_flops = flops_per_token(cfg, seq) * batch * seq / n
    domains = device_domains(devices)
    by_id = {d.id: dom for d, dom in zip(devices, domains)}
    text = hlo_text if hlo_text is not None else compiled.as_text()
    hs = hlo_stats.analyze_hlo(text, device_domain=domains, mesh_axis_domains=mesh_axis_domains(mesh, by_id))
    memory = hlo_stats.memory_stats(compiled)
    cost = hlo_stats.cost_stats(compiled)
    kinds = hs.by_kind()
    wire = sum(v["wire_bytes"] for v in kinds.values())
    slow = sum(v["slow_wire_bytes"] for v in kinds.values())
    report: dict[str, Any] = {
        "devices": n,
        "device_kind": str(getattr(devices[0], "device_kind", "")),
        "platform": str(getattr(devices[0], "platform", "")),
        "mesh": describe_mesh(mesh),
        "model": {"num_hidden_layers": cfg.num_hidden_layers, "seq_len": seq, "global_batch_size": batch,
                  "microbatches": int(config.train.microbatches), "tokens_per_device": batch * seq / n},
        "memory": memory,
        "flops": {"hlo_dots": hs.dot_flops, "hlo_ragged_dot_kernels": hs.ragged_dot_flops,
                  "ragged_fill": hs.ragged_fill(), "roofline": hs.compute_flops(),
                  "cost_analysis": cost.get("flops"), "model": model_flops},
        "hbm_bytes": {"hlo_estimate": hs.hbm_bytes, "cost_analysis": cost.get("bytes_accessed")},
        "collectives": kinds,
        "collective_bytes": sum(v["bytes"] for v in kinds.values()),
        "collective_wire_bytes": wire,
        "collective_slow_wire_bytes": slow,
        "top_collectives": hs.top(12),
        "while_loops": hs.while_loops,
        "notes": list(hs.notes),
    }
    if chip is not None:
        report["chip"] = {"name": chip.name, "peak_flops": chip.peak_flops, "hbm_bytes": chip.hbm_bytes,
                          "hbm_bandwidth": chip.hbm_bandwidth, "ici_bandwidth": chip.ici_bandwidth,
                          "dcn_bandwidth": chip.dcn_bandwidth, "source": chip.source}
        if memory:
            memory["hbm_capacity"] = chip.hbm_bytes
            memory["used_fraction"] = memory["total"] / chip.hbm_bytes
            memory["headroom"] = chip.hbm_bytes - memory["total"]
        report["roofline_estimate"] = roofline(hs.compute_flops(), hs.hbm_bytes, wire - slow, slow, chip,
                                               model_flops=model_flops)
    return report


def compile_and_analyze(config, devices: Sequence, *, mesh: Mesh | None = None,
                        chip: ChipSpec | None = None) -> tuple[Any, dict[str, Any]]:
    """lower_train_step + compile + analyze, timed; returns (compiled, report). When XLA reports that the
    program does not fit in device memory, returns (None, report) with report["fits"] False and what XLA said
    (report["oom"]: the bytes required and available, and XLA:TPU's memory usage report from its log)."""
    if mesh is None:
        mesh = loop.make_mesh(config.mesh, devices)
    t0 = time.perf_counter()
    lowered = lower_train_step(config, devices, mesh=mesh)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        t2 = time.perf_counter()
        report = oom_report(str(e), config, mesh, chip)
        report.update(lower_seconds=t1 - t0, compile_seconds=t2 - t1)
        return None, report
    t2 = time.perf_counter()
    report = analyze(compiled, config, mesh, chip=chip)
    report["fits"] = report["memory"].get("used_fraction", 0.0) <= 1.0   # XLA:GPU compiles past HBM silently
    report["lower_seconds"] = t1 - t0
    report["compile_seconds"] = t2 - t1
    return compiled, report


def _gib(text: str) -> float:
    """'116.07G' / '512.00M' -> bytes."""
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
    m = re.match(r"([\d.]+)\s*([KMGT])", text)
    return float(m.group(1)) * units[m.group(2)] if m else float("nan")


def oom_report(message: str, config, mesh: Mesh, chip: ChipSpec | None, log_rows: int = 20) -> dict:
    """The report of a compile that ran out of device memory: XLA's message, required / available bytes, and
    the first rows of XLA:TPU's memory usage report (largest buffers; read from this process's libtpu log)."""
    devices = list(mesh.devices.flat)
    cfg = loop.model_config(config.model)
    seq, batch = int(config.data.seq_len), int(config.data.global_batch_size)
    oom: dict[str, Any] = {"message": message.strip().splitlines()[0][:2000]}
    m = re.search(r"required for HLO temporaries \(([\d.]+[KMGT])\) exceeds available HBM \(([\d.]+[KMGT])\)",
                  message)
    if m:
        oom["required"], oom["available"] = _gib(m.group(1)), _gib(m.group(2))
    rows = _tpu_log_memory_report(log_rows)
    if rows:
        oom["memory_usage_report"] = rows
        m = re.search(r"Used ([\d.]+[KMGT]) of ([\d.]+[KMGT]) hbm", rows[0])
        if m and "required" not in oom:
            oom["required"], oom["available"] = _gib(m.group(1)), _gib(m.group(2))
    report = {
        "fits": False,
        "devices": len(devices),
        "device_kind": str(getattr(devices[0], "device_kind", "")),
        "platform": str(getattr(devices[0], "platform", "")),
        "mesh": describe_mesh(mesh),
        "model": {"num_hidden_layers": cfg.num_hidden_layers, "seq_len": seq, "global_batch_size": batch,
                  "microbatches": int(config.train.microbatches), "tokens_per_device": batch * seq / len(devices)},
        "oom": oom,
    }
    if chip is not None:
        report["chip"] = {"name": chip.name, "hbm_bytes": chip.hbm_bytes}
    return report


def _tpu_log_memory_report(max_rows: int) -> list[str]:
    """The last 'Memory usage report' libtpu logged in this process (its header line and up to max_rows
    rows), or []."""
    log_dir = os.environ.get("TPU_LOG_DIR", "/tmp/tpu_logs")
    try:
        names = [n for n in os.listdir(log_dir) if ".INFO." in n and n.endswith(f".{os.getpid()}")]
    except OSError:
        return []
    for name in sorted(names, reverse=True):
        try:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        starts = [i for i, line in enumerate(lines) if "Memory usage report" in line]
        if not starts:
            continue
        i = starts[-1]
        out = [lines[i][lines[i].find("Ran out of memory"):] if "Ran out of memory" in lines[i] else lines[i]]
        for line in lines[i + 1:]:
            if re.match(r"^[IWEF]\d{4} ", line) or len(out) > max_rows + 6:
                break
            if line.strip():
                out.append(line.rstrip()[:400])
        return out
    return []


# --------------------------------------------------------------------------------------------------- text

def format_report(r: dict[str, Any]) -> str:
    """The report as a human-readable text (what launch/aot.py prints)."""
    b = hlo_stats.fmt_bytes
    lines = []
    m = r["mesh"]
    lines.append(f"devices: {r['devices']} x {r['device_kind']} ({r['platform']})"
                 + (f"  topology {r['topology']}" if r.get("topology") else "")
                 + (f"  commit {r['commit']}" if r.get("commit") else ""))
    lines.append("mesh: " + "  ".join(f"{k}={v}" for k, v in m["axes"].items()))
    for name, spans in m.get("physical", {}).items():
        lines.append(f"  {name:>7}: " + (" ".join(f"{k}({v})" for k, v in spans.items()) or "-"))
    md = r["model"]
    lines.append(f"model: {md['num_hidden_layers']} layers, seq {md['seq_len']}, global batch "
                 f"{md['global_batch_size']} ({md['microbatches']} microbatches), "
                 f"{md['tokens_per_device']:.0f} tokens/device/step")
    if "compile_seconds" in r:
        lines.append(f"lower {r['lower_seconds']:.1f} s, compile {r['compile_seconds']:.1f} s")
    if not r.get("fits", True):
        oom = r["oom"]
        need = (f": needs {b(oom['required'])} of {b(oom['available'])} per device"
                if "required" in oom else "")
        lines.append(f"DOES NOT FIT in device memory{need}")
        lines.append(f"  XLA: {oom['message']}")
        for row in oom.get("memory_usage_report", []):
            lines.append(f"  | {row}")
        return "\n".join(lines)
    mem = r["memory"]
    if mem:
        lines.append("memory per device:")
        for k in ("argument", "output", "alias", "temp", "generated_code"):
            lines.append(f"  {k:>15}  {b(mem[k]):>12}")
        total = f"  {'total':>15}  {b(mem['total']):>12}   (arguments + outputs + temps - aliases)"
        if "hbm_capacity" in mem:
            total += (f"\n  {'HBM':>15}  {b(mem['hbm_capacity']):>12}   used {100 * mem['used_fraction']:.1f}%, "
                      f"headroom {b(mem['headroom'])}")
        lines.append(total)
    f = r["flops"]
    ca = f"{f['cost_analysis']:.4g}" if f.get("cost_analysis") is not None else "n/a"
    lines.append(f"FLOPs per device: HLO dots {f['hlo_dots']:.4g} (loops counted), model {f['model']:.4g}, "
                 f"cost_analysis {ca} (loop bodies counted once)")
    if f.get("hlo_ragged_dot_kernels"):
        fill = f" x fill {f['ragged_fill']:.3f} of the ragged exchange = {f['roofline']:.4g} for the roofline" \
            if f.get("ragged_fill") is not None else ""
        lines.append(f"  of which ragged-dot kernels on full buffers {f['hlo_ragged_dot_kernels']:.4g}{fill}")
    hb = r["hbm_bytes"]
    lines.append(f"HBM traffic per device (estimate from unfused HLO ops): {b(hb['hlo_estimate'])}")
    lines.append(f"collectives per device per step: {b(r['collective_bytes'])} buffers, "
                 f"{b(r['collective_wire_bytes'])} sent (bandwidth-optimal algorithms)"
                 + (f", of which {b(r['collective_slow_wire_bytes'])} across slices/hosts"
                    if r["collective_slow_wire_bytes"] else ""))
    lines.append(f"  {'kind':<20}{'count':>10}{'bytes':>14}{'sent':>14}")
    for kind, v in sorted(r["collectives"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {kind:<20}{v['count']:>10.0f}{b(v['bytes']):>14}{b(v['wire_bytes']):>14}")
    lines.append("largest collectives (per device, per step):")
    lines.append(f"  {'kind':<20}{'shape':<36}{'group':>6}{'count':>8}{'each':>12}{'total':>12}")
    for c in r["top_collectives"]:
        shape = c["shape"] if len(c["shape"]) <= 34 else c["shape"][:31] + "..."
        flag = " DCN" if c.get("slow_network") else ""
        lines.append(f"  {c['kind']:<20}{shape:<36}{str(c['group_size']):>6}{c['count']:>8.0f}"
                     f"{b(c['bytes_each']):>12}{b(c['bytes']):>12}{flag}")
    loops = r.get("while_loops", [])
    if loops:
        lines.append("while loops: " + ", ".join(f"{w['trip_count']}" for w in loops) + " iterations")
    if "roofline_estimate" in r:
        e, chip = r["roofline_estimate"], r["chip"]
        lines.append(f"ROOFLINE ESTIMATE (not a measurement; {chip['name']}: {chip['peak_flops'] / 1e12:.0f} "
                     f"TFLOP/s, HBM {chip['hbm_bandwidth'] / 1e9:.0f} GB/s, ICI {chip['ici_bandwidth'] / 1e9:.0f} "
                     f"GB/s, DCN {chip['dcn_bandwidth'] / 1e9:.2f} GB/s per chip):")
        lines.append(f"  compute {_secs(e['compute_s'])}, HBM {_secs(e['hbm_s'])}, ICI {_secs(e['ici_s'])}, "
                     f"DCN {_secs(e['dcn_s'])}")
        lines.append(f"  step ~ max(compute, HBM) + ICI + DCN = {_secs(e['step_s'])} -> MFU ~ {100 * e['mfu']:.1f}%"
                     f"   (full overlap: {_secs(e['step_overlapped_s'])} -> {100 * e['mfu_overlapped']:.1f}%)")
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _secs(t: float) -> str:
    return f"{t:.3f} s" if t >= 0.1 else f"{t * 1e3:.3f} ms"
