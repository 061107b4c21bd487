"""Ahead-of-time lowering of the train step and the statistics of compiled programs (kimi_jax.train.aot,
kimi_jax.train.hlo_stats, kimi_jax.train.hlo_parse, kimi_jax.train.chips, launch/aot.py)."""

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.configs.tiny import get_config as tiny_config
from kimi_jax.train import aot, chips, hlo_stats, loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny():
    config = tiny_config()
    config.mesh.update(data=-1, fsdp=2, expert=2, tensor=1)
    config.train.microbatches = 2
    return config


@pytest.fixture(scope="module")
def tiny_compiled():
    config = _tiny()
    lowered = aot.lower_train_step(config, jax.devices())
    return config, lowered, lowered.compile()


def test_lowered_step_has_global_batch_and_runs(tiny_compiled):
    config, lowered, compiled = tiny_compiled
    state_info, batch_info = lowered.args_info[0]
    assert set(batch_info) == set(aot.BATCH_KEYS)
    mesh = loop.make_mesh(config.mesh, jax.devices())
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    for k, info in batch_info.items():
        assert info.shape == (config.data.global_batch_size, config.data.seq_len)
        assert info.dtype == (jnp.float32 if k == "loss_mask" else jnp.int32)
    assert all(info.donated for info in jax.tree.leaves(state_info))

    # the AOT executable is the loop's step: it runs on a real state and batch
    cfg = loop.model_config(config.model)
    _, state, _, _ = loop.init_state(config, cfg, mesh)
    sharding = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    rng = np.random.default_rng(0)
    shape = (config.data.global_batch_size, config.data.seq_len)
    host = {"input_ids": rng.integers(0, 256, shape, dtype=np.int32),
            "targets": rng.integers(0, 256, shape, dtype=np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
            "segment_ids": np.ones(shape, np.int32), "loss_mask": np.ones(shape, np.float32)}
    batch = {k: jax.device_put(v, sharding) for k, v in host.items()}
    new_state, metrics = compiled(state, batch)
    assert int(new_state.step) == 1
    assert np.isfinite(float(metrics["loss"])) and 4.0 < float(metrics["loss"]) < 7.0   # ~ log(256) at init


def test_analyze_tiny_cpu_step(tiny_compiled):
    config, _, compiled = tiny_compiled
    mesh = loop.make_mesh(config.mesh, jax.devices())
    report = aot.analyze(compiled, config, mesh, chip=chips.CHIPS["v5p"])
    assert report["devices"] == 8
    mem = report["memory"]
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    assert mem["argument"] > 0 and 0 < mem["used_fraction"] < 1
    # dots counted from the HLO (loops multiplied) against 6 N + attention: remat, Newton-Schulz and the full
    # (unmasked) attention matmuls add to the model FLOPs, nothing removes from them
    ratio = report["flops"]["hlo_dots"] / report["flops"]["model"]
    assert 1.0 < ratio < 3.0, ratio
    # grads of fsdp-sharded parameters are reduce-scattered or all-reduced, parameters all-gathered
    assert report["collectives"]["all-gather"]["bytes"] > 0
    assert {l["trip_count"] for l in report["while_loops"]} >= {2, 3}     # microbatches, 3 MoE layers
    assert report["roofline_estimate"]["step_s"] > 0
    text = aot.format_report(report)
    assert "ROOFLINE ESTIMATE" in text and "memory per device" in text
    json.loads(hlo_stats.to_json(report))


def test_lowered_step_is_built_like_loop_train():
    """lower_train_step builds the step exactly as loop.train does: make_train_step(graphdef, cfg, tx, lr,
    **step_kwargs(config)) under jit with donate_argnums=0, after check_config."""
    def calls(fn):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        found = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
                name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                found.setdefault(name, ([ast.unparse(a) for a in node.args],
                                        {kw.arg: ast.unparse(kw.value) for kw in node.keywords}))
        return found

    train, lowered = calls(loop.train), calls(aot.lower_train_step)
    assert train["make_train_step"] == (["graphdef", "cfg", "tx", "lr"], {None: "step_kwargs(config)"})
    assert lowered["make_train_step"] == (["graphdef", "cfg", "tx", "lr"], {None: "loop.step_kwargs(config)"})
    assert train["jit"][1] == lowered["jit"][1] == {"donate_argnums": "0"}
    assert train["check_config"] == lowered["check_config"] == (["config", "mesh"], {})


def _scan_collectives(c, ws):
    def inner(c, w):
        g = jax.lax.all_gather(w, "x", tiled=True)                         # [64, 32] f32 = 8192 B
        s = jax.lax.psum(c, "x")                                            # [16, 32] f32 = 2048 B
        r = jax.lax.psum_scatter(g * 2.0, "x", scatter_dimension=0, tiled=True)   # in [64, 32] = 8192 B
        return s * 0.5 + r.sum(), None

    def outer(c, w2):
        c, _ = jax.lax.scan(inner, c, w2)                                   # 2 iterations
        return jax.lax.psum(c * 3.0, "x") * 0.25, None                      # [16, 32] f32 = 2048 B

    return jax.lax.scan(outer, c, ws)[0]                                    # 3 iterations


def test_collective_bytes_of_nested_scans_are_exact():
    mesh = jax.make_mesh((8,), ("x",))
    fn = jax.jit(jax.shard_map(_scan_collectives, mesh=mesh, in_specs=(P(), P(None, None, "x")), out_specs=P(),
                               check_vma=False))
    c = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=NamedSharding(mesh, P()))
    ws = jax.ShapeDtypeStruct((3, 2, 64, 32), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "x")))
    stats = hlo_stats.analyze_hlo(fn.lower(c, ws).compile().as_text())
    assert sorted(l["trip_count"] for l in stats.while_loops) == [2, 3]
    kinds = stats.by_kind()
    assert kinds["all-gather"]["count"] == 6 and kinds["all-gather"]["bytes"] == 6 * 8192
    assert kinds["reduce-scatter"]["count"] == 6 and kinds["reduce-scatter"]["bytes"] == 6 * 8192
    assert kinds["all-reduce"]["count"] == 6 + 3 and kinds["all-reduce"]["bytes"] == (6 + 3) * 2048
    assert kinds["all-gather"]["wire_bytes"] == 6 * 8192 * 7 / 8
    assert kinds["all-reduce"]["wire_bytes"] == (6 + 3) * 2048 * 2 * 7 / 8
    assert all(c.group_size == 8 for c in stats.collectives)
    top = stats.top(1)[0]
    assert top["count"] == 6 and top["bytes_each"] == 8192 and top["kind"] in ("all-gather", "reduce-scatter")


# XLA:TPU-style text: no known_trip_count (the trip count comes from the loop condition), async collectives,
# tiled layouts, iota and explicit replica groups, a batched matmul written as a convolution, a conditional.
TPU_STYLE_HLO = """\
HloModule synthetic, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[]{:T(128)} parameter(0)
  %b = f32[]{:T(128)} parameter(1)
  ROOT %s = f32[]{:T(128)} add(%a, %b)
}

%bmm (p0: bf16[4,16,32], p1: bf16[4,16,32]) -> f32[4,16,16] {
  %p0 = bf16[4,16,32]{2,1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[4,16,32]{2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.1 = f32[4,16,16]{2,1,0:T(8,128)} convolution(%p0, %p1), window={size=4 stride=3 lhs_dilate=4}, dim_labels=0bf_0oi->0bf, metadata={op_name="dot_general"}
}

%inner_body (p: (s32[], f32[4,128], bf16[2,64], bf16[4,16,32])) -> (s32[], f32[4,128], bf16[2,64], bf16[4,16,32]) {
  %p = (s32[]{:T(128)}, f32[4,128]{1,0:T(8,128)}, bf16[2,64]{1,0:T(8,128)(2,1)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %x = f32[4,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %y = bf16[2,64]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=2
  %z = bf16[4,16,32]{2,1,0:T(8,128)(2,1)} get-tuple-element(%p), index=3
  %all-gather-start = (f32[4,128]{1,0:T(8,128)}, f32[16,128]{1,0:T(8,128)}) all-gather-start(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, backend_config={"flag_configs":[]}
  %all-gather-done = f32[16,128]{1,0:T(8,128)} all-gather-done(%all-gather-start)
  %collective-permute-start = (bf16[2,64]{1,0:T(8,128)(2,1)}, bf16[2,64]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%y), channel_id=2, source_target_pairs={{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}
  %collective-permute-done = bf16[2,64]{1,0:T(8,128)(2,1)} collective-permute-done(%collective-permute-start)
  %fusion.1 = f32[4,16,16]{2,1,0:T(8,128)} fusion(%z, %z), kind=kOutput, calls=%bmm
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %slice = f32[4,128]{1,0:T(8,128)} slice(%all-gather-done), slice={[0:4], [0:128]}
  ROOT %t = (s32[]{:T(128)}, f32[4,128]{1,0:T(8,128)}, bf16[2,64]{1,0:T(8,128)(2,1)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) tuple(%next, %slice, %collective-permute-done, %z)
}

%inner_cond (q: (s32[], f32[4,128], bf16[2,64], bf16[4,16,32])) -> pred[] {
  %q = (s32[]{:T(128)}, f32[4,128]{1,0:T(8,128)}, bf16[2,64]{1,0:T(8,128)(2,1)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) parameter(0)
  %k = s32[]{:T(128)} get-tuple-element(%q), index=0
  %four = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[]{:T(512)} compare(%k, %four), direction=LT
}

%outer_body (r: (s32[], f32[8,8], bf16[4,16,32])) -> (s32[], f32[8,8], bf16[4,16,32]) {
  %r = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%r), index=0
  %v = f32[8,8]{1,0:T(8,128)} get-tuple-element(%r), index=1
  %w = bf16[4,16,32]{2,1,0:T(8,128)(2,1)} get-tuple-element(%r), index=2
  %all-reduce.1 = f32[8,8]{1,0:T(8,128)} all-reduce(%v), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add
  %zero_i = s32[]{:T(128)} constant(1)
  %x0 = f32[4,128]{1,0:T(8,128)} broadcast(%v), dimensions={}
  %y0 = bf16[2,64]{1,0:T(8,128)(2,1)} broadcast(%w), dimensions={}
  %init = (s32[]{:T(128)}, f32[4,128]{1,0:T(8,128)}, bf16[2,64]{1,0:T(8,128)(2,1)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) tuple(%zero_i, %x0, %y0, %w)
  %inner = (s32[]{:T(128)}, f32[4,128]{1,0:T(8,128)}, bf16[2,64]{1,0:T(8,128)(2,1)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) while(%init), condition=%inner_cond, body=%inner_body, backend_config={"flag_configs":[]}
  %one.2 = s32[]{:T(128)} constant(1)
  %next.2 = s32[]{:T(128)} add(%j, %one.2)
  ROOT %t2 = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) tuple(%next.2, %all-reduce.1, %w)
}

%outer_cond (u: (s32[], f32[8,8], bf16[4,16,32])) -> pred[] {
  %u = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) parameter(0)
  %n = s32[]{:T(128)} get-tuple-element(%u), index=0
  %three = s32[]{:T(128)} constant(3)
  ROOT %gt = pred[]{:T(512)} compare(%three, %n), direction=GT
}

%wrapped_rs (w0: f32[64,16]) -> f32[8,16] {
  %w0 = f32[64,16]{1,0:T(8,128)} parameter(0)
  ROOT %reduce-scatter.1 = f32[8,16]{1,0:T(8,128)} reduce-scatter(%w0), channel_id=4, replica_groups={}, dimensions={0}, to_apply=%add
}

%branch_a (ba: bf16[8,32]) -> bf16[8,32] {
  %ba = bf16[8,32]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %all-to-all.1 = bf16[8,32]{1,0:T(8,128)(2,1)} all-to-all(%ba), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}
}

%branch_b (bb: bf16[8,32]) -> bf16[8,32] {
  %bb = bf16[8,32]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %all-to-all.2 = bf16[8,32]{1,0:T(8,128)(2,1)} all-to-all(%bb), channel_id=6, replica_groups=[1,8]<=[8], dimensions={0}
}

ENTRY %main (a0: f32[8,8], a1: bf16[4,16,32], a2: f32[64,16], a3: bf16[8,32], a4: s32[], a5: bf16[16,64], a6: s32[8], a7: bf16[4,64,32], a8: s32[4]) -> f32[8,16] {
  %a0 = f32[8,8]{1,0:T(8,128)} parameter(0)
  %a1 = bf16[4,16,32]{2,1,0:T(8,128)(2,1)} parameter(1)
  %a2 = f32[64,16]{1,0:T(8,128)} parameter(2)
  %a3 = bf16[8,32]{1,0:T(8,128)(2,1)} parameter(3)
  %a4 = s32[]{:T(128)} parameter(4)
  %c0 = s32[]{:T(128)} constant(0)
  %copy.1 = s32[]{:T(128)} copy(%c0)
  %tuple.1 = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) tuple(%copy.1, %a0, %a1)
  %while.1 = (s32[]{:T(128)}, f32[8,8]{1,0:T(8,128)}, bf16[4,16,32]{2,1,0:T(8,128)(2,1)}) while(%tuple.1), condition=%outer_cond, body=%outer_body, metadata={op_name="while"}
  %async-start = ((f32[64,16]{1,0:T(8,128)}), f32[8,16]{1,0:T(8,128)}, u32[]{:S(2)}) async-start(%a2), calls=%wrapped_rs
  %async-done = f32[8,16]{1,0:T(8,128)} async-done(%async-start), calls=%wrapped_rs
  %cond = bf16[8,32]{1,0:T(8,128)(2,1)} conditional(%a4, %a3, %a3), branch_computations={%branch_a, %branch_b}
  %a5 = bf16[16,64]{1,0:T(8,128)(2,1)} parameter(5)
  %a6 = s32[8]{0:T(128)} parameter(6)
  %recv = bf16[128,64]{1,0:T(8,128)(2,1)} broadcast(%a5), dimensions={}
  %ragged = bf16[128,64]{1,0:T(8,128)(2,1)} ragged-all-to-all(%a5, %recv, %a6, %a6, %a6, %a6), channel_id=7, replica_groups=[2,4]<=[4,2]T(1,0)
  %a7 = bf16[4,64,32]{2,1,0:T(8,128)(2,1)} parameter(7)
  %a8 = s32[4]{0:T(128)} parameter(8)
  %ragged-dot-none = bf16[128,32]{1,0:T(8,128)(2,1)} custom-call(%a8, %ragged, %a7), custom_call_target="tpu_custom_call", frontend_attributes={ragged_dot_tiling="128,64,32"}, metadata={op_name="jit(step)/ragged_dot_general/ragged-dot-none"}
  ROOT %out = f32[8,16]{1,0:T(8,128)} copy(%async-done)
}
"""


def test_tpu_style_hlo():
    stats = hlo_stats.analyze_hlo(TPU_STYLE_HLO, device_domain=[0, 0, 1, 1, 0, 0, 1, 1])
    loops = {l["name"]: l for l in stats.while_loops}
    assert loops["while.1"]["trip_count"] == 3 and loops["while.1"]["source"] == "condition"
    assert loops["inner"]["trip_count"] == 4                 # init 1, i < 5
    by = {c.kind: c for c in stats.collectives}
    ag = by["all-gather"]
    assert (ag.count, ag.bytes, ag.group_size, ag.slow_network) == (12, 4 * 128 * 4 * 4, 4, True)  # [2,4]<=[8]
    assert ag.wire_bytes == ag.bytes * 3 / 4
    ar = by["all-reduce"]
    assert (ar.count, ar.bytes, ar.group_size, ar.slow_network) == (3, 256, 2, False)
    assert ar.wire_bytes == 256
    cp = by["collective-permute"]
    assert (cp.count, cp.bytes, cp.wire_bytes, cp.slow_network) == (12, 256, 256, True)   # 1 -> 2
    rs = by["reduce-scatter"]
    assert (rs.count, rs.bytes, rs.group_size, rs.slow_network) == (1, 64 * 16 * 4, 8, True)
    kinds = stats.by_kind()
    assert kinds["all-to-all"]["count"] == 2 and kinds["all-to-all"]["bytes"] == 2 * 512     # both branches
    assert any("conditional" in n for n in stats.notes)
    # one tap per window along the batch-as-spatial dim; the ragged-dot kernel over its whole 128-row buffer
    assert stats.ragged_dot_flops == 2 * 128 * 64 * 32
    assert stats.dot_flops == 12 * 2 * (4 * 16 * 16) * 32 + stats.ragged_dot_flops
    assert stats.ragged_fill() == 16 / 128                   # the ragged exchange's send / receive buffers
    assert stats.compute_flops() == stats.dot_flops - stats.ragged_dot_flops * (1 - 16 / 128)
    assert kinds["all-gather"]["slow_wire_bytes"] == kinds["all-gather"]["wire_bytes"]
    ra = by["ragged-all-to-all"]           # the smaller buffer (the 16-row input), groups {0,2,4,6}, {1,3,5,7}
    assert (ra.count, ra.bytes, ra.group_size, ra.slow_network) == (1, 16 * 64 * 2, 4, True)
    assert ra.wire_bytes == ra.bytes * 3 / 4


def test_roofline_arithmetic():
    chip = chips.ChipSpec("test", peak_flops=100e12, hbm_bytes=16e9, hbm_bandwidth=1e12, ici_bandwidth=100e9,
                          dcn_bandwidth=10e9, source="")
    r = chips.roofline(flops=50e12, hbm_bytes=2e12, ici_wire_bytes=10e9, slow_wire_bytes=1e9, chip=chip,
                       model_flops=40e12)
    assert r["compute_s"] == pytest.approx(0.5)
    assert r["hbm_s"] == pytest.approx(2.0)
    assert r["ici_s"] == pytest.approx(0.1)
    assert r["dcn_s"] == pytest.approx(0.1)
    assert r["step_s"] == pytest.approx(2.2)
    assert r["step_overlapped_s"] == pytest.approx(2.0)
    assert r["mfu"] == pytest.approx(40e12 / (2.2 * 100e12))
    assert r["mfu_overlapped"] == pytest.approx(0.2)


def test_topology_names():
    v5p = aot.parse_topology("v5p-512")
    assert v5p["chips"] == 256 and v5p["kwargs"] == dict(topology_name="v5:4x8x8", chip_config_name="megacore",
                                                         chips_per_host_bounds=(2, 2, 1), wrap=(True, True, True))
    assert aot.parse_topology("v5p-64")["kwargs"]["topology_name"] == "v5:2x4x4"
    assert aot.parse_topology("v5p-64")["kwargs"]["wrap"] == (False, True, True)
    assert aot.parse_topology("v5p-1024")["kwargs"]["topology_name"] == "v5:8x8x8"
    assert aot.parse_topology("v6e-64")["kwargs"] == dict(topology_name="v6e:8x8")
    assert aot.parse_topology("h100-256") == {"platform": "cuda", "family": "h100", "gpus": 256, "nodes": 32}
    with pytest.raises(ValueError):
        aot.parse_topology("v5p-7")
    assert aot.resolve_mesh_sizes({"data": 1, "fsdp": -1, "expert": 8, "tensor": 1}, 256) == {
        "data": 1, "fsdp": 32, "expert": 8, "tensor": 1}


def _run_launch_aot(args: list[str], json_out, backend_available: bool):
    """launch/aot.py on the tiny config (2 layers, data=2, fsdp the rest) with `args`; None when the backend's
    package is not installed (after checking that the launcher says what to install), else the finished run."""
    cmd = [sys.executable, os.path.join(ROOT, "launch/aot.py"), "--config=experiments/configs/tiny.py",
           "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.model.num_hidden_layers=2", *args,
           f"--json_out={json_out}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not backend_available:
        assert proc.returncode != 0 and "requirements-aot.txt" in proc.stderr
        return None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.slow
def test_launch_aot_tpu_multislice(tmp_path):
    """launch/aot.py on a 2-slice v5p-8 (2 x 4 chips, data split over DCN) when libtpu is installed (see
    requirements-aot.txt); without it, the launcher says what to install."""
    out = tmp_path / "report.json"
    proc = _run_launch_aot(["--topology=v5p-8", "--num_slices=2", "--dcn=data"], out, _libtpu_available())
    if proc is None:
        return
    assert "ROOFLINE ESTIMATE" in proc.stdout
    report = json.loads(out.read_text())
    assert report["devices"] == 8 and report["device_kind"] == "TPU v5"
    assert report["mesh"]["axes"] == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    assert report["mesh"]["physical"]["data"] == {"slice": 2}
    assert 0 < report["memory"]["total"] < report["memory"]["hbm_capacity"]
    # one module per slice: the data-parallel gradient reduction crosses the slices (megascale sends over DCN),
    # the fsdp collectives (groups of 4) stay inside them
    assert report["collectives"]["all-reduce"]["slow_wire_bytes"] > 0
    assert any("per-slice module" in n for n in report["notes"])
    top = report["top_collectives"]
    assert any(c["slow_network"] for c in top) or report["collective_slow_wire_bytes"] > 0
    assert all(not c["slow_network"] for c in top if c["group_size"] == 4)


def _cuda_plugin_available() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


@pytest.mark.slow
def test_launch_aot_gpu_cluster(tmp_path):
    """launch/aot.py on 2 nodes of 8 H100s (compile-only through the CUDA plugin, no GPU) when the plugin is
    installed (see requirements-aot.txt); without it, the launcher says what to install."""
    out = tmp_path / "report.json"
    if _run_launch_aot(["--topology=h100-16"], out, _cuda_plugin_available()) is None:
        return
    report = json.loads(out.read_text())
    assert report["devices"] == 16 and "H100" in report["device_kind"]
    assert report["mesh"]["axes"] == {"data": 2, "fsdp": 8, "expert": 1, "tensor": 1}
    # data spans the two nodes (InfiniBand), fsdp stays inside a node (NVLink)
    assert report["collectives"]["all-reduce"]["slow_wire_bytes"] > 0
    assert all(not c["slow_network"] for c in report["top_collectives"] if c["group_size"] == 8)
