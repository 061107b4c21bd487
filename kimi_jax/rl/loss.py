"""Policy losses for RL on verifiable rewards, and the per-token statistics a training step logs.

Shapes: P prompts, K sampled responses per prompt, T token positions, V vocabulary.
    logp, old_logp, mask   [P, K, T]   per-token log-probabilities of the sampled tokens under pi_theta (being
                                      trained) and pi_old (the policy that sampled them); mask 1.0 on response
                                      tokens, 0.0 on prompt and padding
    rewards                [P, K]
Every loss is a fp32 scalar averaged over prompts and samples. old_logp and rewards are treated as constants
(stop_gradient), so the gradient only flows through logp.

`policy_loss` is Kimi K2's objective (arXiv 2507.20534 section 3.2.3; POSTTRAINING.md section 1); `grpo_loss`
is DeepSeekMath's GRPO (arXiv 2402.03300 section 4.1) on the same inputs, for A/B comparisons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CLIP_EPS = 0.2           # GRPO ratio clip (DeepSeekMath's value)
DEFAULT_ADVANTAGE_EPS = 1e-6     # added to the group's reward std in GRPO's advantage


def policy_loss(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, rewards: jax.Array,
                tau: float) -> jax.Array:
    """Kimi K2's RL loss (K2 section 3.2.3, k1.5's online policy mirror descent):

        L = mean_x (1/K) sum_i ( r_i - rbar - tau * log(pi_theta(y_i|x) / pi_old(y_i|x)) )^2,   rbar = (1/K) sum_i r_i

    with the sequence-level log ratio log(pi_theta/pi_old)(y_i|x) = sum_t mask_t (logp_t - old_logp_t) (no length
    normalisation). Per sample its gradient is -2 tau [ (r - rbar) grad log pi_theta - (tau/2) grad (log ratio)^2 ]
    (averaged over P*K samples). tau > 0 is not published (a third-party reproduction uses 0.01).

    logp, old_logp, mask [P, K, T]; rewards [P, K] -> fp32 scalar."""
    _check_inputs(logp, old_logp, mask, rewards)
    if isinstance(tau, (int, float)) and tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_ratio = sequence_log_ratio(logp, old_logp, mask)
    rewards = jax.lax.stop_gradient(rewards.astype(jnp.float32))
    baseline = jnp.mean(rewards, axis=1, keepdims=True)
    return jnp.mean(jnp.square(rewards - baseline - tau * log_ratio))


def grpo_loss(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, rewards: jax.Array, *,
              clip_eps: float = DEFAULT_CLIP_EPS, advantage_eps: float = DEFAULT_ADVANTAGE_EPS) -> jax.Array:
    """GRPO with outcome rewards (DeepSeekMath, arXiv 2402.03300 eq. 3), the variant used here:

        A_i     = (r_i - mean(r)) / (std(r) + advantage_eps)           group-normalised, std over the K samples (ddof 0)
        rho_i,t = exp(logp_i,t - old_logp_i,t)                         per-token ratio
        L       = -mean_x (1/K) sum_i (1/|y_i|) sum_t min(rho_i,t A_i, clip(rho_i,t, 1 - eps, 1 + eps) A_i)

    i.e. a per-token PPO clip with eps = clip_eps, each response's tokens averaged over its own length |y_i| (the
    mask's sum; an empty response contributes 0), then the mean over samples and prompts. No KL penalty term
    (beta = 0, no reference model): the KL to pi_old is logged with `kl_to_old` instead. With K = 1 the advantage
    and so the loss are 0.

    logp, old_logp, mask [P, K, T]; rewards [P, K] -> fp32 scalar."""
    _check_inputs(logp, old_logp, mask, rewards)
    rewards = jax.lax.stop_gradient(rewards.astype(jnp.float32))
    advantage = (rewards - jnp.mean(rewards, axis=1, keepdims=True)) / (
        jnp.std(rewards, axis=1, keepdims=True) + advantage_eps)
    mask = mask.astype(jnp.float32)
    log_ratio = logp.astype(jnp.float32) - jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    ratio = jnp.exp(jnp.where(mask > 0, log_ratio, 0.0))      # masked before exp: padding may hold anything
    advantage = advantage[..., None]
    objective = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * advantage)
    per_response = jnp.sum(objective * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return -jnp.mean(per_response)


def sequence_log_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """log(pi_theta(y|x) / pi_old(y|x)) = sum_t mask_t (logp_t - old_logp_t): [..., T] -> fp32 [...].
    old_logp is a constant (stop_gradient)."""
    diff = logp.astype(jnp.float32) - jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    return jnp.sum(jnp.where(mask > 0, diff, 0.0) * mask.astype(jnp.float32), axis=-1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets], in fp32: logits [..., T, V], targets int [..., T] -> [..., T].

    Position t's logits score targets[t]: for a sequence `tokens` pass logits[..., :-1, :] and tokens[..., 1:]."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits [..., T, V] and targets [..., T] disagree: logits {logits.shape}, "
                         f"targets {targets.shape}")
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """log pi(y|x) = sum_t mask_t log pi(targets_t | prefix):
    logits [..., T, V], targets, mask [..., T] -> fp32 [...]."""
    if mask.shape != targets.shape:
        raise ValueError(f"mask and targets must have one shape [..., T]: mask {mask.shape}, targets {targets.shape}")
    return jnp.sum(token_logprobs(logits, targets) * mask.astype(jnp.float32), axis=-1)


def kl_to_old(logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """KL(pi_old || pi_theta) of the response distributions, nats per response, from tokens sampled by pi_old:
    Schulman's k3 estimator per token, k3 = rho - 1 - log rho with rho = pi_theta / pi_old (unbiased, >= 0), summed
    over each response's tokens (the chain rule of KL over positions) and averaged over responses.

    logp, old_logp, mask [..., T] -> fp32 scalar. For monitoring only (not differentiated)."""
    if not logp.shape == old_logp.shape == mask.shape:
        raise ValueError(f"logp, old_logp and mask must have one shape: {logp.shape}, {old_logp.shape}, {mask.shape}")
    log_rho = jax.lax.stop_gradient(jnp.where(mask > 0, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0))
    k3 = jnp.expm1(log_rho) - log_rho
    return jnp.mean(jnp.sum(k3 * mask.astype(jnp.float32), axis=-1))


def mean_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over response tokens of the policy's entropy H_t = -sum_v p_t,v log p_t,v, nats:
    logits [..., T, V], mask [..., T] -> fp32 scalar (0 when the mask is empty). For monitoring only."""
    if logits.shape[:-1] != mask.shape:
        raise ValueError(f"logits [..., T, V] and mask [..., T] disagree: logits {logits.shape}, mask {mask.shape}")
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    log_p = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_inputs(logp, old_logp, mask, rewards) -> None:
    if logp.ndim != 3:
        raise ValueError(f"logp must be [prompts, K, tokens], got shape {logp.shape}")
    if old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp and mask must have one shape [prompts, K, tokens]: logp {logp.shape}, "
                         f"old_logp {old_logp.shape}, mask {mask.shape}")
    if rewards.shape != logp.shape[:2]:
        raise ValueError(f"rewards must be [prompts, K] = {logp.shape[:2]}, got {rewards.shape}")
