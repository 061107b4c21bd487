"""The RL train step (kimi_jax/rl/step.py) against losses and gradients computed by hand from the model's own
logprobs: K2's loss and its closed-form gradient (POSTTRAINING.md section 1), GRPO, the PTX term, QK-Clip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import rl_tiny
from experiments.configs.base import override
from kimi_jax.rl import grpo_loss, policy_loss
from kimi_jax.rl.step import make_rl_loss, make_rl_step
from kimi_jax.train import loop
from kimi_jax.train.step import TrainState

P, K, T = 2, 4, 12
TAU = 0.1


@pytest.fixture(scope="module")
def setup():
    """(graphdef, cfg, params, batch, (state, tx, lr)): a 2-layer tiny model (one dense, one MoE layer) on one
    device as training builds it (MuonClip), and a random rollout batch whose old logprobs differ from the
    model's, plus a PTX batch."""
    config = override(rl_tiny.get_config(), {"model.num_hidden_layers": 2, "mesh.data": 1})
    cfg = loop.model_config(config.model)
    mesh = loop.make_mesh(config.mesh, jax.devices()[:1])
    graphdef, state, tx, lr = loop.init_state(config, cfg, mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (P * K, T)).astype(np.int32)
    prompt_len = rng.integers(2, 5, P * K)
    response_len = rng.integers(1, T - 5, P * K)
    positions = np.arange(T)
    mask = ((positions >= prompt_len[:, None] - 1) & (positions < (prompt_len + response_len)[:, None] - 1))
    real = positions < (prompt_len + response_len)[:, None]
    batch = {"input_ids": np.where(real, ids, 0), "targets": np.where(real, np.roll(ids, -1, 1), 0) * mask,
             "positions": np.broadcast_to(positions, (P * K, T)).astype(np.int32),
             "segment_ids": real.astype(np.int32), "mask": mask.astype(np.float32),
             "rewards": rng.integers(0, 2, (P, K)).astype(np.float32)}
    batch["old_logp"] = (model_logp(graphdef, state.params, batch)
                         + rng.normal(0, 0.5, (P * K, T))).astype(np.float32) * batch["mask"]
    ptx_ids = rng.integers(0, 256, (8, 10)).astype(np.int32)
    batch["ptx"] = {"input_ids": ptx_ids, "targets": np.roll(ptx_ids, -1, 1),
                    "positions": np.broadcast_to(np.arange(10), (8, 10)).astype(np.int32),
                    "segment_ids": np.ones((8, 10), np.int32),
                    "loss_mask": (rng.uniform(size=(8, 10)) < 0.7).astype(np.float32)}
    return graphdef, cfg, state.params, jax.tree.map(jnp.asarray, batch), (state, tx, lr)


def model_logp(graphdef, params, batch):
    """log pi(targets[t] | prefix) [N, T] from the model's plain forward, in NumPy."""
    logits = np.asarray(forward(graphdef, params, batch), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0] - logz


def forward(graphdef, params, batch):
    """The model's logits [b, s, vocab] (jitted: eager op-by-op execution is slow on CPU)."""
    return jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["input_ids"], b["positions"], b["segment_ids"]))(
        params, {k: batch[k] for k in ("input_ids", "positions", "segment_ids")})


def max_logits(graphdef, params, batch):
    """QK-Clip's S_max per layer and head [layers, heads] of the model's forward on batch."""
    return jax.jit(lambda p, b: nnx.merge(graphdef, p).forward(b["input_ids"], b["positions"],
                                                                 b["segment_ids"])[1]["max_logits"])(
        params, {k: batch[k] for k in ("input_ids", "positions", "segment_ids")})


def rollout_only(batch):
    return {k: v for k, v in batch.items() if k != "ptx"}


def k2_loss_by_hand(logp, batch):
    """Section 1's loss in NumPy, and the weights c_i = dL/dlog pi(y_i|x) = -2 tau (r - rbar - tau log ratio)/(PK)."""
    mask, old = np.asarray(batch["mask"]), np.asarray(batch["old_logp"])
    log_ratio = ((logp - old) * mask).sum(-1).reshape(P, K)
    rewards = np.asarray(batch["rewards"])
    residual = rewards - rewards.mean(1, keepdims=True) - TAU * log_ratio
    return np.mean(residual ** 2), -2 * TAU * residual.reshape(-1) / (P * K)


def test_k2_step_loss_and_gradient_are_the_closed_form(setup):
    """One SGD(lr 1) step: the new parameters are params - grad, with grad = sum_i c_i grad log pi(y_i|x)."""
    graphdef, cfg, params, batch, _ = setup
    batch = rollout_only(batch)
    expected_loss, c = k2_loss_by_hand(model_logp(graphdef, params, batch), batch)

    def weighted_seq_logp(params):
        logits = nnx.merge(graphdef, params)(batch["input_ids"], batch["positions"], batch["segment_ids"])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(jnp.asarray(c, jnp.float32) * jnp.sum(logp * batch["mask"], -1))

    expected_grads = jax.jit(jax.grad(weighted_seq_logp))(params)
    tx = optax.sgd(1.0)
    step = jax.jit(make_rl_step(graphdef, cfg, tx, optax.constant_schedule(1.0), tau=TAU,
                                router_bias_update_rate=0.0))
    zero = jnp.zeros((), jnp.int32)
    new, metrics = step(TrainState(zero, params, tx.init(params), zero, zero), batch)
    assert float(metrics["loss"]) == pytest.approx(expected_loss, rel=1e-4)
    assert float(metrics["policy_loss"]) == float(metrics["loss"])
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(expected_grads)), rel=1e-4)
    assert expected_loss > 0.1 and float(metrics["grad_norm"]) > 1e-3
    for (path, p), g, q in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected_grads),
                               jax.tree.leaves(new.params)):
        np.testing.assert_allclose(np.asarray(q), np.asarray(p) - np.asarray(g), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    assert int(new.step) == 1 and int(metrics["skipped"]) == 0


def test_kl_and_entropy_metrics(setup):
    graphdef, cfg, params, batch, _ = setup
    batch = rollout_only(batch)
    _, (metrics, _, _) = jax.jit(make_rl_loss(graphdef, cfg, tau=TAU))(params, batch)
    logp, mask, old = model_logp(graphdef, params, batch), np.asarray(batch["mask"]), np.asarray(batch["old_logp"])
    log_rho = (logp - old) * mask
    expected_kl = np.mean(((np.exp(log_rho) - 1 - log_rho) * mask).sum(-1))
    assert float(metrics["kl_to_old"]) == pytest.approx(expected_kl, rel=1e-4)
    logits = np.asarray(forward(graphdef, params, batch), np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    entropy = -(np.exp(log_p) * log_p).sum(-1)
    assert float(metrics["entropy"]) == pytest.approx((entropy * mask).sum() / mask.sum(), rel=1e-4)


def test_grpo_option_is_grpo_loss_of_the_models_logprobs(setup):
    graphdef, cfg, params, batch, _ = setup
    batch = rollout_only(batch)
    logp = jnp.asarray(model_logp(graphdef, params, batch), jnp.float32).reshape(P, K, T)
    expected = grpo_loss(logp, batch["old_logp"].reshape(P, K, T), batch["mask"].reshape(P, K, T),
                         batch["rewards"], clip_eps=0.2)
    grpo = make_rl_loss(graphdef, cfg, loss="grpo", clip_eps=0.2)
    value, grads = jax.jit(jax.value_and_grad(lambda p: grpo(p, batch)[0]))(params)
    assert float(value) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    k2 = jax.jit(make_rl_loss(graphdef, cfg, loss="k2", tau=TAU))(params, batch)[0]
    assert float(k2) == pytest.approx(float(policy_loss(logp, batch["old_logp"].reshape(P, K, T),
                                                        batch["mask"].reshape(P, K, T), batch["rewards"], TAU)),
                                      rel=1e-4)
    assert float(optax.tree.norm(grads)) > 1e-4
    with pytest.raises(ValueError, match="config.rl.loss"):
        make_rl_loss(graphdef, cfg, loss="ppo")


def test_ptx_weight_adds_exactly_the_ptx_term(setup):
    """L(w) - L(0) = w * (mean next-token loss on the PTX batch's masked tokens), value and gradient."""
    graphdef, cfg, params, batch, _ = setup
    ptx = batch["ptx"]
    logits = np.asarray(forward(graphdef, params, ptx), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, np.asarray(ptx["targets"])[..., None], -1)[..., 0]
    expected_ptx = (nll * np.asarray(ptx["loss_mask"])).sum() / np.asarray(ptx["loss_mask"]).sum()

    @jax.jit
    def value_and_grad(params, weight, batch):
        return jax.value_and_grad(make_rl_loss(graphdef, cfg, tau=TAU, ptx_weight=weight), has_aux=True)(params,
                                                                                                          batch)

    (l0, _), g0 = value_and_grad(params, 0.0, batch)
    (l_rl, _), g_rl = value_and_grad(params, 0.0, rollout_only(batch))
    (l1, (metrics, _, _)), g1 = value_and_grad(params, 0.3, batch)
    assert float(metrics["ptx_loss"]) == pytest.approx(expected_ptx, rel=1e-5)
    assert float(l0) == float(l_rl)
    assert float(l1) - float(l0) == pytest.approx(0.3 * expected_ptx, rel=1e-5)
    ptx_only = make_rl_loss(graphdef, cfg, tau=TAU, ptx_weight=1.0)
    g_ptx = jax.jit(jax.grad(lambda p: ptx_only(p, batch)[1][0]["ptx_loss"]))(params)
    for a, b, c, d in zip(*map(jax.tree.leaves, (g1, g0, g_ptx, g_rl))):
        np.testing.assert_allclose(np.asarray(a) - np.asarray(b), 0.3 * np.asarray(c), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(np.asarray(b), np.asarray(d), rtol=1e-6, atol=1e-9)


def test_muonclip_step_reports_and_applies_qk_clip(setup):
    """MuonClip as training builds it, with a QK-Clip threshold below every head's max logit: every head is
    clipped, and max_attention_logit is the max over the rollout and PTX forwards."""
    graphdef, cfg, params, batch, (state, tx, lr) = setup
    per_head = np.maximum(*[np.asarray(max_logits(graphdef, params, b)) for b in (batch, batch["ptx"])])
    s_max, threshold = float(per_head.max()), float(per_head.min()) / 2
    step = jax.jit(make_rl_step(graphdef, cfg, tx, lr, tau=TAU, ptx_weight=0.1, qk_clip_tau=threshold))
    new, metrics = step(state, batch)
    assert float(metrics["max_attention_logit"]) == pytest.approx(s_max, rel=1e-5)
    assert float(metrics["clipped_head_share"]) == 1.0
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    new_max = jnp.max(max_logits(graphdef, new.params, batch))
    assert float(new_max) < (threshold + s_max) / 2


def test_sharded_on_8_devices_equals_1_device(setup):
    """The RL objective with PTX on a (data 2, fsdp 2, expert 2) mesh of 8 CPU devices: the same loss, metrics,
    attention logits and gradients as on one device, up to summation order. (The update after it is the
    training step's; Muon's orthogonalisation lifts the gradient's near-zero singular directions, where summation
    order shows, so updates are compared through their gradients.)"""
    graphdef, cfg, params, batch, _ = setup
    config = override(rl_tiny.get_config(), {"model.num_hidden_layers": 2, "mesh.data": 2, "mesh.fsdp": 2,
                                             "mesh.expert": 2})
    graphdef8, abstract, _, _ = loop.abstract_train_state(config, cfg, loop.make_mesh(config.mesh))
    params8 = jax.device_put(params, jax.tree.map(lambda x: x.sharding, abstract.params))
    results = [jax.jit(jax.value_and_grad(make_rl_loss(g, cfg, tau=TAU, ptx_weight=0.1), has_aux=True))(p, batch)
               for g, p in ((graphdef, params), (graphdef8, params8))]
    ((one, (one_metrics, one_logits, _)), one_grads), ((eight, (eight_metrics, eight_logits, _)), eight_grads) = results
    assert len(jax.tree.leaves(eight_grads)[0].sharding.device_set) == 8
    assert float(eight) == pytest.approx(float(one), rel=1e-5)
    for key in one_metrics:
        assert float(eight_metrics[key]) == pytest.approx(float(one_metrics[key]), rel=1e-5, abs=1e-7), key
    np.testing.assert_allclose(np.asarray(eight_logits), np.asarray(one_logits), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one_grads)[0], jax.tree.leaves(eight_grads)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a) + 1e-12, jax.tree_util.keystr(path)


def test_microbatched_step_equals_the_whole_batch_step(setup, loss="k2"):
    """microbatches=2 (one prompt per group, PTX beside): the same loss, metrics and SGD update as one forward
    over the whole batch, up to summation order."""
    graphdef, cfg, params, batch, _ = setup
    tx = optax.sgd(1.0)
    zero = jnp.zeros((), jnp.int32)
    results = []
    for microbatches in (1, 2):
        step = jax.jit(make_rl_step(graphdef, cfg, tx, optax.constant_schedule(1.0), loss=loss, tau=TAU,
                                    ptx_weight=0.1, router_bias_update_rate=1e-3, microbatches=microbatches))
        results.append(step(TrainState(zero, params, tx.init(params), zero, zero), batch))
    (one, one_metrics), (two, two_metrics) = results
    for key in ("loss", "policy_loss", "kl_to_old", "entropy", "ptx_loss", "grad_norm", "max_attention_logit"):
        assert float(two_metrics[key]) == pytest.approx(float(one_metrics[key]), rel=1e-5, abs=1e-7), key
    assert float(one_metrics["grad_norm"]) > 1e-3
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one.params)[0], jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="config.rl.microbatches"):
        make_rl_step(graphdef, cfg, tx, optax.constant_schedule(1.0), microbatches=0)
    with pytest.raises(ValueError, match=r"config.rl.microbatches \(3\) must divide"):
        jax.eval_shape(make_rl_step(graphdef, cfg, tx, optax.constant_schedule(1.0), microbatches=3),
                       TrainState(zero, params, tx.init(params), zero, zero), batch)
