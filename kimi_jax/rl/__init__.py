"""Post-training with RL on verifiable rewards (Kimi K2 section 3.2; POSTTRAINING.md sections 1-3).

Stable entry points:
    policy_loss(logp, old_logp, mask, rewards, tau) -> scalar    K2's loss; logp/old_logp/mask [prompts, K, tokens]
    grpo_loss(logp, old_logp, mask, rewards, *, clip_eps, advantage_eps) -> scalar    GRPO, for A/B runs
    token_logprobs(logits, targets), sequence_logprobs(logits, targets, mask), kl_to_old(logp, old_logp, mask),
    mean_entropy(logits, mask)
    run_python(program, tests, *, timeout_s, limits) -> SandboxResult;  SandboxPool(workers).map(...)
    score(problems, responses, *, pool) -> [Reward(score, reason)];  excluded(rewards)
    apply_budget(mask, budget), budget_penalty(rewards, truncated, penalty), length_reward(lengths, correct)
    tasks.FAMILIES, tasks.generate(family, seed, count, *, difficulty, split)
    make_rl_step(graphdef, cfg, tx, lr_schedule, *, loss, tau, ptx_weight, qk_clip_tau, ...) -> step(state, batch)
    make_rl_loss(graphdef, cfg, *, loss, tau, clip_eps, ptx_weight) -> loss_fn(params, batch)
    kimi_jax.rl.loop.train_rl(config, workdir, *, reward_fn) -> last metrics    the RL loop (launch/rl.py)
    critic: the self-critique rubric reward (kimi_jax/rl/critic.py; config.critic):
        Critic(graphdef, tokenizer, *, rubrics, ...).preference(params, [(prompt, a, b)]) -> P(a beats b),
        .rubric_rewards(params, prompts, responses [P][K]) -> [P, K], .accuracy, .bt_batch;
        critic_prompt, critic_messages, choice_token_ids, preference(model, tokenizer, pairs),
        bt_loss / paired_bt_loss(choice_logits, labels, weights), make_critic_step(graphdef, cfg, tx, lr, choice_ids),
        verifiable_pairs(problems, responses, scores, *, samples_per_prompt, use_reference), Rubrics
"""

from kimi_jax.rl import critic, tasks
from kimi_jax.rl.critic import (Critic, Rubrics, bt_loss, choice_token_ids, critic_messages, critic_prompt,
                                make_critic_step, paired_bt_loss, preference, verifiable_pairs)
from kimi_jax.rl.loss import grpo_loss, kl_to_old, mean_entropy, policy_loss, sequence_logprobs, token_logprobs
from kimi_jax.rl.rewards import RewardError, apply_budget, budget_penalty, excluded, length_reward, score
from kimi_jax.rl.sandbox import STATUSES, Limits, SandboxPool, SandboxResult, run_python
from kimi_jax.rl.step import make_rl_loss, make_rl_step
from kimi_jax.rl.tasks import Problem, Reward

__all__ = ["Critic", "Limits", "Problem", "Reward", "RewardError", "Rubrics", "STATUSES", "SandboxPool",
           "SandboxResult", "apply_budget", "bt_loss", "budget_penalty", "choice_token_ids", "critic",
           "critic_messages", "critic_prompt", "excluded", "grpo_loss", "kl_to_old", "length_reward",
           "make_critic_step", "make_rl_loss", "make_rl_step", "mean_entropy", "paired_bt_loss", "policy_loss",
           "preference", "run_python", "score", "sequence_logprobs", "tasks", "token_logprobs", "verifiable_pairs"]
