"""kimi_jax.rl.loss against closed-form math (POSTTRAINING.md section 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.rl import loss


def _random_inputs(seed=0, prompts=3, k=4, tokens=6):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (prompts, k, tokens)).astype(np.float32)
    old_logp = logp + rng.normal(0, 0.3, logp.shape).astype(np.float32)
    mask = (rng.uniform(size=logp.shape) < 0.7).astype(np.float32)
    rewards = rng.integers(0, 2, (prompts, k)).astype(np.float32)
    return logp, old_logp, mask, rewards


def _numpy_k2(logp, old_logp, mask, rewards, tau):
    total = 0.0
    prompts, k = rewards.shape
    for p in range(prompts):
        rbar = sum(rewards[p]) / k
        for i in range(k):
            log_ratio = sum(m * (a - b) for a, b, m in zip(logp[p, i], old_logp[p, i], mask[p, i]))
            total += (rewards[p, i] - rbar - tau * log_ratio) ** 2
    return total / (prompts * k)


def test_hand_computed_example():
    """One prompt, K = 2, rewards 1 and 0 (rbar = 0.5); log ratios 0.5 + 0.25 (the prompt token, mask 0, has a
    huge difference that must not count) and -1; tau = 0.1:
    ((0.5 - 0.075)^2 + (-0.5 + 0.1)^2) / 2 = (0.180625 + 0.16) / 2 = 0.1703125."""
    logp = jnp.array([[[-9.0, -1.0, -2.0], [0.0, -3.0, -1.0]]])
    old_logp = jnp.array([[[0.0, -1.5, -2.25], [0.0, -2.0, -1.0]]])
    mask = jnp.array([[[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]])
    rewards = jnp.array([[1.0, 0.0]])
    assert float(loss.policy_loss(logp, old_logp, mask, rewards, 0.1)) == pytest.approx(0.1703125, rel=1e-6)


def test_equals_numpy_reference_on_random_inputs():
    for seed in range(3):
        inputs = _random_inputs(seed)
        expected = _numpy_k2(*inputs, tau=0.05)
        assert float(loss.policy_loss(*map(jnp.asarray, inputs), 0.05)) == pytest.approx(expected, rel=1e-5)


def test_gradient_wrt_logp_is_the_closed_form():
    """d L / d logp[p,i,t] = -2 tau (r - rbar - tau * log_ratio) mask / (P K)."""
    logp, old_logp, mask, rewards = map(jnp.asarray, _random_inputs(1))
    tau = 0.2
    grad = jax.grad(loss.policy_loss)(logp, old_logp, mask, rewards, tau)
    log_ratio = np.sum((np.asarray(logp) - np.asarray(old_logp)) * np.asarray(mask), -1)
    advantage = np.asarray(rewards) - np.asarray(rewards).mean(1, keepdims=True)
    expected = -2 * tau * (advantage - tau * log_ratio)[..., None] * np.asarray(mask) / rewards.size
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_gradient_through_a_policy_is_section_1s_formula():
    """A tiny softmax policy theta [T, V]: grad L = (1/(P K)) sum -2 tau [ (r - rbar) grad log pi
    - (tau/2) grad (log pi/pi_old)^2 ], with grad log pi from jax.jacobian of the sequence log-prob."""
    rng = np.random.default_rng(3)
    prompts, k, tokens, vocab, tau = 2, 2, 3, 4, 0.3
    theta = jnp.asarray(rng.normal(size=(tokens, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (prompts, k, tokens)))
    mask = jnp.asarray(rng.uniform(size=(prompts, k, tokens)) < 0.8, jnp.float32)
    old_logp = jnp.asarray(-rng.uniform(1, 2, (prompts, k, tokens)), jnp.float32)
    rewards = jnp.asarray(rng.integers(0, 2, (prompts, k)), jnp.float32)

    def logp_of(theta):
        return loss.token_logprobs(jnp.broadcast_to(theta, (prompts, k, tokens, vocab)), targets)

    grad = jax.grad(lambda th: loss.policy_loss(logp_of(th), old_logp, mask, rewards, tau))(theta)
    seq_grad = jax.jacobian(lambda th: jnp.sum(logp_of(th) * mask, -1))(theta)          # [P, K, T, V]
    log_ratio = jnp.sum((logp_of(theta) - old_logp) * mask, -1)
    advantage = rewards - rewards.mean(1, keepdims=True)
    per_sample = -2 * tau * (advantage[..., None, None] * seq_grad
                             - (tau / 2) * 2 * log_ratio[..., None, None] * seq_grad)
    np.testing.assert_allclose(grad, per_sample.mean((0, 1)), rtol=1e-4, atol=1e-6)


def test_prompt_and_padding_tokens_are_masked():
    logp, old_logp, mask, rewards = map(jnp.asarray, _random_inputs(2))
    noise = jnp.where(mask > 0, 0.0, 1e3)
    base = loss.policy_loss(logp, old_logp, mask, rewards, 0.1)
    assert float(loss.policy_loss(logp + noise, old_logp - noise, mask, rewards, 0.1)) == pytest.approx(float(base))
    grad = jax.grad(loss.policy_loss)(logp, old_logp, mask, rewards, 0.1)
    assert float(jnp.max(jnp.abs(jnp.where(mask > 0, 0.0, grad)))) == 0.0
    assert float(loss.grpo_loss(logp + noise, old_logp - noise, mask, rewards)) == pytest.approx(
        float(loss.grpo_loss(logp, old_logp, mask, rewards)))


def test_k_equals_one():
    """K = 1: r - rbar = 0, so L = tau^2 log_ratio^2 (only the pull toward pi_old), and GRPO's advantage is 0."""
    logp = jnp.array([[[-1.0, -2.0]], [[-0.5, -0.5]]])
    old_logp = jnp.array([[[-1.5, -2.0]], [[-0.5, -0.5]]])
    mask = jnp.ones_like(logp)
    rewards = jnp.array([[1.0], [0.0]])
    assert float(loss.policy_loss(logp, old_logp, mask, rewards, 0.5)) == pytest.approx((0.5 * 0.5) ** 2 / 2)
    assert float(jnp.max(jnp.abs(jax.grad(loss.policy_loss)(old_logp, old_logp, mask, rewards, 0.5)))) == 0.0
    assert float(loss.grpo_loss(logp, old_logp, mask, rewards)) == 0.0


def test_grpo_hand_computed():
    """K = 2, rewards 1, 0: mean 0.5, std 0.5, advantages +-0.5 / 0.5 = +-1 (eps 0). Sample 0: ratios e^0.5
    (clipped to 1.2 for A > 0) and 1 -> mean(1.2, 1) = 1.1. Sample 1: ratio e^-0.5 = 0.6065 (A < 0: min(-0.6065,
    0.8 * -1) = -0.8), one token (the second is padding) -> -0.8. Loss = -(1.1 - 0.8) / 2 = -0.15."""
    logp = jnp.array([[[-1.0, -2.0], [-2.0, -7.0]]])
    old_logp = jnp.array([[[-1.5, -2.0], [-1.5, 0.0]]])
    mask = jnp.array([[[1.0, 1.0], [1.0, 0.0]]])
    rewards = jnp.array([[1.0, 0.0]])
    value = loss.grpo_loss(logp, old_logp, mask, rewards, clip_eps=0.2, advantage_eps=0.0)
    assert float(value) == pytest.approx(-0.15, rel=1e-6)


def test_grpo_gradient_at_the_sampling_policy_is_the_policy_gradient():
    """At logp = old_logp the ratio is 1 and unclipped: d L / d logp_t = -A_i mask_t / (|y_i| P K)."""
    logp, _, mask, rewards = map(jnp.asarray, _random_inputs(4))
    grad = jax.grad(loss.grpo_loss)(logp, logp, mask, rewards)
    r = np.asarray(rewards)
    advantage = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + loss.DEFAULT_ADVANTAGE_EPS)
    lengths = np.maximum(np.asarray(mask).sum(-1), 1.0)
    expected = -(advantage / lengths)[..., None] * np.asarray(mask) / r.size
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_token_and_sequence_logprobs():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]]))     # [1, T=2, V=3], already normalised
    targets = jnp.array([[0, 2]])
    np.testing.assert_allclose(loss.token_logprobs(logits + 7.0, targets), np.log([[0.5, 0.3]]), rtol=1e-6)
    assert float(loss.sequence_logprobs(logits, targets, jnp.array([[0.0, 1.0]]))[0]) == pytest.approx(np.log(0.3))


def test_kl_to_old():
    """k3 = e^d - 1 - d per token, d = logp - old_logp; and a Monte-Carlo check against the exact KL(old || new)
    of two categorical distributions (one token per response)."""
    logp = jnp.array([[0.2, -0.3, 5.0]])
    old_logp = jnp.zeros((1, 3))
    mask = jnp.array([[1.0, 1.0, 0.0]])
    expected = (np.exp(0.2) - 1 - 0.2) + (np.exp(-0.3) - 1 + 0.3)
    assert float(loss.kl_to_old(logp, old_logp, mask)) == pytest.approx(expected, rel=1e-6)
    old_p, new_p = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    samples = np.random.default_rng(0).choice(3, size=200_000, p=old_p)
    estimate = loss.kl_to_old(jnp.log(new_p[samples])[:, None], jnp.log(old_p[samples])[:, None],
                              jnp.ones((samples.size, 1)))
    assert float(estimate) == pytest.approx(np.sum(old_p * np.log(old_p / new_p)), rel=0.02)


def test_mean_entropy():
    uniform = jnp.zeros((2, 3, 8))
    assert float(loss.mean_entropy(uniform, jnp.ones((2, 3)))) == pytest.approx(np.log(8), rel=1e-6)
    logits = jnp.stack([jnp.zeros(4), jnp.array([0.0, -1e9, -1e9, -1e9])])[None]      # log 4 and 0
    assert float(loss.mean_entropy(logits, jnp.array([[1.0, 1.0]]))) == pytest.approx(np.log(4) / 2, rel=1e-6)
    assert float(loss.mean_entropy(logits, jnp.array([[0.0, 1.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_shape_errors_name_the_arrays():
    logp, old_logp, mask, rewards = map(jnp.asarray, _random_inputs())
    with pytest.raises(ValueError, match=r"rewards must be \[prompts, K\] = \(3, 4\)"):
        loss.policy_loss(logp, old_logp, mask, rewards[:, :3], 0.1)
    with pytest.raises(ValueError, match="old_logp"):
        loss.grpo_loss(logp, old_logp[..., :5], mask, rewards)
    with pytest.raises(ValueError, match=r"logp must be \[prompts, K, tokens\]"):
        loss.policy_loss(logp[0], old_logp[0], mask[0], rewards, 0.1)
    with pytest.raises(ValueError, match="tau must be > 0"):
        loss.policy_loss(logp, old_logp, mask, rewards, 0.0)
    with pytest.raises(ValueError, match="targets"):
        loss.token_logprobs(jnp.zeros((2, 5, 7)), jnp.zeros((2, 4), jnp.int32))
