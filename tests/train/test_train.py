"""The training system end to end: learning, exact resume after kill -9, multi-process, NaN handling."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import small
from experiments.configs.base import override
from kimi_jax.data import ByteTokenizer, corpus_unigram_entropy, default_corpus_files
from kimi_jax.train import loop
from kimi_jax.train.metrics import MetricsWriter, drop_lines_after
from kimi_jax.train.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = {  # on experiments/configs/small.py (2 layers, 8 x 64 tokens): log every step, checkpoint every 4
    "log_every": 1, "checkpoint_every": 4, "sample.max_new_tokens": 0, "optimizer.warmup_steps": 3,
}


def small_config(**overrides):
    return override(small.get_config(), {**SMALL, **overrides})


def flags(**overrides):
    out = []
    for key, value in {**SMALL, **overrides}.items():
        out.append(f"--config.{key}={value}")
    return out


def read_losses(workdir):
    """{step: loss} from metrics.jsonl, which has one line per step (asserted)."""
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps
    return {r["step"]: r["loss"] for r in records}


def run_train(workdir, *extra, devices=8, env_extra=None, wait=True):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               **(env_extra or {}))
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"--workdir={workdir}",
           f"--config={ROOT / 'experiments' / 'configs' / 'small.py'}", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_loss_falls_well_below_unigram_entropy(tmp_path):
    config = small_config(steps=60, checkpoint_every=1000, log_every=10, **{"optimizer.learning_rate": 1e-2})
    summary = loop.train(config, str(tmp_path))
    files = default_corpus_files(max_bytes=config.data.max_corpus_bytes)
    entropy = corpus_unigram_entropy(files, ByteTokenizer())
    assert 2.5 < entropy < 4.0                           # bytes of Python source: ~3.1 nats
    assert summary["loss"] < entropy - 0.6, (summary["loss"], entropy)
    losses = read_losses(tmp_path)
    assert losses[10] > losses[60]


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_losses(tmp_path):
    """kill -9 mid-run, restart: every logged loss equals the uninterrupted run's, bit for bit."""
    steps = ["--config.steps=14"]
    run_train(tmp_path / "straight", *steps, *flags())
    proc = run_train(tmp_path / "killed", *steps, *flags(), wait=False)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert len(metrics.read_text().splitlines()) < 14, "the run finished before it was killed"
    run_train(tmp_path / "killed", *steps, *flags())
    straight, resumed = read_losses(tmp_path / "straight"), read_losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 15))
    assert resumed == straight


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 CPU devices (jax.distributed, gloo) train like 1 process x 8, then save and resume."""
    run_train(tmp_path / "one", "--config.steps=6", *flags())
    port = 20000 + os.getpid() % 20000
    procs = [run_train(tmp_path / "two", "--config.steps=6", *flags(), f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}", devices=4, wait=False) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    # gloo all-reduces sum in another order than the in-process ones: equal at first, 1e-5-level drift after
    # a few steps (Newton-Schulz in bf16 amplifies it)
    np.testing.assert_allclose(two[1], one[1], rtol=1e-6)
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-4)
    procs = [run_train(tmp_path / "two", "--config.steps=8", *flags(), f"--coordinator_address=127.0.0.1:{port + 1}",
                       "--num_processes=2", f"--process_id={i}", devices=4, wait=False) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    resumed = read_losses(tmp_path / "two")
    assert sorted(resumed) == list(range(1, 9))           # resumed from step 6, not from scratch
    assert [resumed[s] for s in range(1, 7)] == [two[s] for s in range(1, 7)]


def test_resume_onto_another_mesh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    loop.train(small_config(steps=4), tmp_path.name)                      # a relative workdir works too
    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    with open(tmp_path / "metrics.jsonl", "a") as f:                      # as if the run died at step 9
        f.writelines(json.dumps({"step": s, "loss": -1.0}) + "\n" for s in range(5, 10))
        f.write('{"step": 10, "lo')                                       # killed mid-write
    config = small_config(steps=6, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 2})
    summary = loop.train(config, str(tmp_path))
    assert summary["step"] == 6 and np.isfinite(summary["loss"])
    losses = read_losses(tmp_path)                                        # one line per step
    assert sorted(losses) == list(range(1, 7)) and all(loss > 0 for loss in losses.values())
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[:4] == logged


def test_metrics_writer_drops_the_steps_after_the_resumed_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 31)]
    path.write_text("".join(lines[:12] + lines[9:]))             # steps 10-12 logged twice (an older resume)
    writer = MetricsWriter(str(tmp_path), total_steps=40, initial_step=20)
    writer.write(21, {"loss": 0.5})
    writer.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 22))
    assert records[-1]["loss"] == 0.5 and path.read_text().startswith("".join(lines[:9]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]   # no temp file left
    assert drop_lines_after(str(path), 21) == 0 and drop_lines_after(str(tmp_path / "none.jsonl"), 0) == 0
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"train.microbatches": 3}, r"config\.train\.microbatches \(3\) must divide the per-step batch "
                                r"config\.data\.global_batch_size \(8\)"),
    ({"train.microbatches": 0}, r"config\.train\.microbatches must be an integer >= 1, got 0"),
    ({"train.microbatches": 2}, r"config\.train\.microbatches \(2\) leaves 4 rows per microbatch, not "
                                r"divisible by the mesh's batch split .* = 8"),
    ({"log_every": 0}, r"config\.log_every must be an integer >= 1, got 0"),
    ({"checkpoint_every": -5}, r"config\.checkpoint_every must be an integer >= 1, got -5"),
    ({"keep_checkpoints": 0}, r"config\.keep_checkpoints must be an integer >= 1, got 0"),
    ({"steps": -1}, r"config\.steps must be an integer >= 0, got -1"),
    ({"data.global_batch_size": 12}, r"config\.data\.global_batch_size \(12\) must be divisible by the "
                                     r"mesh's batch split .* = 8"),
])
def test_config_errors_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        loop.train(small_config(**overrides), str(tmp_path))            # 8 devices: a batch split of 8
    assert not list(tmp_path.iterdir())                                 # before anything was built or written
    config = small_config(**{"train.microbatches": 2, "mesh.data": 4, "mesh.tensor": 2})
    loop.check_config(config, loop.make_mesh(config.mesh))              # 4 rows per microbatch on 4: fine


def test_convert_workdir_to_hf(tmp_path):
    """launch/convert.py: a trained workdir becomes an HF checkpoint with the same logits."""
    sys.path.insert(0, str(ROOT / "launch"))
    import convert
    import kimi_jax
    from kimi_jax.train.checkpointing import restore_model
    loop.train(small_config(steps=2), str(tmp_path / "run"))
    convert.convert(str(tmp_path / "run"), str(tmp_path / "hf"))
    ids = jnp.arange(16, dtype=jnp.int32).reshape(8, 2)
    trained, exported = restore_model(str(tmp_path / "run")), kimi_jax.load_hf(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(nnx.state(trained)), jax.tree.leaves(nnx.state(exported))):
        np.testing.assert_array_equal(a, b)                          # the weights bit for bit
    # sharded (8-device mesh) vs single-device forward: equal up to summation order
    np.testing.assert_allclose(jax.jit(lambda m: m(ids))(trained), exported(ids), atol=1e-6)


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    real_init = loop.init_state

    def poisoned(*args):
        graphdef, state, tx, lr = real_init(*args)
        params = jax.tree.map(lambda x: x, state.params)
        params["norm"]["weight"] = params["norm"]["weight"] * jnp.nan
        return graphdef, state._replace(params=params), tx, lr

    monkeypatch.setattr(loop, "init_state", poisoned)
    config = small_config(steps=10, **{"train.max_consecutive_nonfinite": 3})
    with pytest.raises(loop.NonFiniteLossError, match="3 consecutive steps"):
        loop.train(config, str(tmp_path))


def one_step_setup(devices=None, **overrides):
    """(cfg, graphdef, state, tx, lr, batch): the small model initialised on a mesh of `devices` (default: all 8
    as data 4 x tensor 2), one batch."""
    mesh = {"mesh.data": 4, "mesh.tensor": 2} if devices is None else {"mesh.data": len(devices)}
    config = small_config(**{**mesh, "data.prefetch": 0, **overrides})
    cfg = loop.model_config(config.model)
    graphdef, state, tx, lr = loop.init_state(config, cfg, loop.make_mesh(config.mesh, devices))
    batch = {k: jnp.asarray(v) for k, v in next(loop.data_input.make_input(config.data, cfg, seed=0)).items()}
    return cfg, graphdef, state, tx, lr, batch


CONSTANT_LR = {"optimizer.schedule": "constant", "optimizer.learning_rate": 1e-2}


def test_skipped_step_keeps_the_state_and_microbatches_add_up():
    cfg, graphdef, state, tx, lr, batch = one_step_setup(**CONSTANT_LR)
    # Plain SGD at lr 1e-2: the update is -lr * gradient, so the parameters after one step compare the
    # accumulated gradients themselves (AdamW's first step, ~lr * sign(g), would hide a wrong scale).
    sgd = optax.sgd(lr)
    state = state._replace(opt_state=sgd.init(state.params))
    one = jax.jit(make_train_step(graphdef, cfg, sgd, lr, qk_clip_tau=100.0))
    two = jax.jit(make_train_step(graphdef, cfg, sgd, lr, microbatches=2, qk_clip_tau=100.0))
    s1, m1 = one(state, batch)
    s2, m2 = two(state, batch)
    assert float(m1["lr"]) == pytest.approx(1e-2) and int(m1["skipped"]) == int(m2["skipped"]) == 0
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    step_of = lambda s: jax.tree.map(lambda a, b: np.asarray(a - b, np.float64), s.params, state.params)
    one_step, two_steps = jax.tree.leaves(step_of(s1)), jax.tree.leaves(step_of(s2))
    bias = s1.params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]       # moved by its own rule
    norm = np.sqrt(sum(np.sum(d ** 2) for d in one_step) - np.sum(np.asarray(bias, np.float64) ** 2))
    np.testing.assert_allclose(norm, 1e-2 * float(m1["grad_norm"]), rtol=1e-4)     # the parameters moved
    # equal to 0.1% of each tensor's largest change, plus the rounding of the fp32 parameters themselves
    for a, b, p in zip(two_steps, one_step, jax.tree.leaves(state.params)):
        ulp = float(np.spacing(np.abs(np.asarray(p, np.float32)).max()))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * np.abs(b).max() + 2 * ulp)
    bad = dict(batch, loss_mask=batch["loss_mask"] * jnp.nan)
    s3, m3 = one(state, bad)
    assert int(m3["skipped"]) == 1 and int(s3.nonfinite_streak) == 1 and int(s3.step) == 1
    for a, b in zip(jax.tree.leaves((s3.params, s3.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(bias).max()) == pytest.approx(1e-3)   # one aux-loss-free update of size u


def head_factors(gamma, parts):
    """gamma [L, H] -> per-column factors [L, H * sum(widths)]: each head's parts scaled by gamma**power."""
    cols = [np.repeat(gamma[:, :, None] ** power, width, axis=2) for width, power in parts]
    return np.concatenate(cols, axis=2).reshape(gamma.shape[0], -1)


def test_qk_clip_in_the_step_rescales_exactly_the_heads_above_tau():
    cfg, graphdef, state, tx, lr, batch = one_step_setup(jax.devices()[:1], **CONSTANT_LR)   # muonclip
    forward = jax.jit(lambda params, b: nnx.merge(graphdef, params).forward(
        b["input_ids"], b["positions"], b["segment_ids"])[1]["max_logits"])
    s_max = np.asarray(forward(state.params, batch), np.float64)                      # [layers, heads]
    ordered = np.sort(s_max.ravel())
    half = len(ordered) // 2
    tau = float(ordered[half - 1] + ordered[half]) / 2                                # half of the heads above
    assert ordered[half] - ordered[half - 1] > 1e-4 * ordered[half]     # no head on the edge of tau
    plain, m0 = jax.jit(make_train_step(graphdef, cfg, tx, lr, qk_clip_tau=None))(state, batch)
    clipped, m1 = jax.jit(make_train_step(graphdef, cfg, tx, lr, qk_clip_tau=tau))(state, batch)
    np.testing.assert_allclose(m0["max_attention_logit"], ordered[-1], rtol=1e-5)   # the step saw these S_max
    above = s_max > tau
    assert float(m1["clipped_head_share"]) == pytest.approx(above.mean()) == 0.5
    gamma = np.where(above, tau / s_max, 1.0)
    assert gamma.min() < 0.99                                                         # a visible rescale

    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_parts, kv_parts = ((nope, 0.5), (rope, 1.0)), ((nope, 0.5), (v, 0.0))
    layers = {"dense_layers": slice(0, cfg.first_k_dense_replace),
              "moe_layers": slice(cfg.first_k_dense_replace, cfg.num_hidden_layers)}
    for stack, rows in layers.items():
        for name, parts in (("q_b_proj", q_parts), ("kv_b_proj", kv_parts)):
            got = np.asarray(clipped.params[stack]["self_attn"][name]["kernel"], np.float64)
            unclipped = np.asarray(plain.params[stack]["self_attn"][name]["kernel"], np.float64)
            factor = head_factors(gamma[rows], parts)[:, None, :]
            np.testing.assert_allclose(got, unclipped * factor, rtol=1e-5, atol=1e-9)
            kept = np.broadcast_to(factor == 1.0, got.shape)              # unclipped heads and v columns
            np.testing.assert_allclose(got[kept], unclipped[kept], rtol=1e-6, atol=1e-9)
            assert not np.allclose(got[~kept], unclipped[~kept], rtol=1e-3, atol=0)
    clip_kernels = lambda path: any(k in ("q_b_proj", "kv_b_proj") for k in map(str, path))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(clipped.params), jax.tree.leaves(plain.params)):
        if not clip_kernels([getattr(k, "key", k) for k in path]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=str(path))    # nothing else touched


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path):
    proc = run_train(tmp_path, "--config.steps=1000", *flags(checkpoint_every=1000), wait=False)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 1000
