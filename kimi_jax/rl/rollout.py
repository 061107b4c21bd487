"""Rollouts for RL: prompts in the chat format, K samples per prompt from the engine, rewards with K2's budget
control, and the fixed-shape arrays the RL step takes (kimi_jax/rl/step.py).

A prompt is the task's text as a user turn, rendered with `kimi_jax.chat.encode(..., add_generation_prompt=True)`
(the model answers after `<|im_assistant|>assistant<|im_middle|>`); a response ends at `<|im_end|>` (or the
tokenizer's EOS), the stop token being its last token. Its text (stop token removed) goes to the reward.

Budget control (K2 section 3.2.3): each task family has a token budget; the engine samples at most that many
tokens, and a response that reaches it without stopping is truncated: scored as is, then penalised
(`budget_penalty`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from kimi_jax import chat
from kimi_jax.rl.rewards import budget_penalty, length_reward
from kimi_jax.rl.tasks import Problem, Reward
from kimi_jax.serve.engine import Request

RewardFn = Callable[[Sequence[Problem], Sequence[str]], list[Reward]]


@dataclasses.dataclass
class Rollout:
    """P prompts x K samples (row p * K + k of the flat lists): prompt and response token ids, the engine's
    logprobs of the response tokens, response texts, task scores (None: not scored, e.g. a sandbox error) and
    whether each response was truncated at its budget."""

    problems: list[Problem]
    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    truncated: np.ndarray          # bool [P, K]
    scores: list[float | None]
    samples_per_prompt: int

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.responses]).reshape(-1, self.samples_per_prompt)


def prompt_ids(tokenizer, problem: Problem, system_prompt: str | None) -> list[int]:
    """The chat-format prompt of a problem: [system turn] + user turn + generation prompt. system_prompt None:
    the template's default system turn."""
    messages = ([] if system_prompt is None else [{"role": "system", "content": system_prompt}])
    messages.append({"role": "user", "content": problem.prompt})
    return chat.encode(tokenizer, messages, add_generation_prompt=True)[0]


def response_text(tokenizer, tokens: Sequence[int], stop_ids) -> str:
    """The text of a response without its final stop token."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def sample(engine, tokenizer, problems: Sequence[Problem], *, samples_per_prompt: int, budgets: dict,
           temperature: float, top_p: float, seeds: Sequence[int], system_prompt: str | None,
           reward_fn: RewardFn) -> Rollout:
    """K = samples_per_prompt samples of each problem from `engine` (problem p draws with seeds[p] + k), each of at
    most budgets[problem.family] tokens, scored by reward_fn(problems, texts)."""
    missing = sorted({p.family for p in problems} - set(budgets))
    if missing:
        raise ValueError(f"config.rollout.budgets has no token budget for task families {missing}")
    prompts = [prompt_ids(tokenizer, problem, system_prompt) for problem in problems]
    ids = [engine.add_request(Request(prompt, max_tokens=int(budgets[problem.family]), temperature=temperature,
                                      top_p=top_p, seed=int(seed), n=samples_per_prompt))
           for problem, prompt, seed in zip(problems, prompts, seeds)]
    results = engine.run()
    stop_ids = engine.stop_token_ids
    samples = [s for rid in ids for s in results[rid].samples]
    for rid in ids:
        engine.discard(rid)
    texts = [response_text(tokenizer, s.tokens, stop_ids) for s in samples]
    flat_problems = [problem for problem in problems for _ in range(samples_per_prompt)]
    rewards = reward_fn(flat_problems, texts)
    return Rollout(problems=list(problems), prompts=[p for p in prompts for _ in range(samples_per_prompt)],
                   responses=[list(s.tokens) for s in samples], logprobs=[list(s.logprobs) for s in samples],
                   texts=texts,
                   truncated=np.array([s.finish_reason == "length" for s in samples]).reshape(-1, samples_per_prompt),
                   scores=[r.score for r in rewards], samples_per_prompt=samples_per_prompt)


def shaped_rewards(rollout: Rollout, *, penalty: float, length_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(rewards [P, K] the loss sees, scored [P, K] bool). rewards = score - penalty * truncated (K2's budget
    control) + length_weight * k1.5's length reward (correct: score >= 1). A sample without a score takes the
    mean score of its prompt's scored samples (0 if none), so it moves neither the baseline nor, with its mask
    cleared (`batch_arrays`), the gradient."""
    k = rollout.samples_per_prompt
    scored = np.array([s is not None for s in rollout.scores]).reshape(-1, k)
    raw = np.array([0.0 if s is None else s for s in rollout.scores], np.float32).reshape(-1, k)
    fill = np.where(scored.any(1), (raw * scored).sum(1) / np.maximum(scored.sum(1), 1), 0.0)[:, None]
    rewards = np.where(scored, raw, fill)
    rewards = budget_penalty(rewards, rollout.truncated & scored, penalty)
    if length_weight:
        rewards = rewards + length_weight * length_reward(rollout.lengths, (raw >= 1.0) & scored)
    return rewards.astype(np.float32), scored


def batch_arrays(rollout: Rollout, rewards: np.ndarray, scored: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The RL step's rollout batch (kimi_jax/rl/step.py) of seq_len positions per row: prompt + response
    right-padded; the mask covers the positions whose target is a response token of a scored sample."""
    n = len(rollout.responses)
    arrays = {"input_ids": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
              "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
              "segment_ids": np.zeros((n, seq_len), np.int32), "mask": np.zeros((n, seq_len), np.float32),
              "old_logp": np.zeros((n, seq_len), np.float32)}
    for row, (prompt, response, logprobs) in enumerate(zip(rollout.prompts, rollout.responses, rollout.logprobs)):
        tokens = prompt + response
        if len(tokens) > seq_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens and a response of {len(response)} exceed "
                             f"config.rollout.seq_len ({seq_len})")
        arrays["input_ids"][row, :len(tokens)] = tokens
        arrays["targets"][row, :len(tokens) - 1] = tokens[1:]
        arrays["segment_ids"][row, :len(tokens)] = 1
        start = len(prompt) - 1                     # the last prompt position predicts the first response token
        arrays["mask"][row, start:start + len(response)] = scored.reshape(-1)[row]
        arrays["old_logp"][row, start:start + len(response)] = logprobs
    arrays["rewards"] = rewards
    return arrays


def ptx_arrays(tokenizer, problems: Sequence[Problem], system_prompt: str | None,
               seq_len: int) -> dict[str, np.ndarray]:
    """The PTX batch (training step format, [len(problems), seq_len]): each problem's reference answer as a chat
    (user turn, assistant turn), next-token loss on the assistant's tokens only (chat.encode's loss mask)."""
    n = len(problems)
    arrays = {"input_ids": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
              "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
              "segment_ids": np.zeros((n, seq_len), np.int32), "loss_mask": np.zeros((n, seq_len), np.float32)}
    for row, problem in enumerate(problems):
        messages = ([] if system_prompt is None else [{"role": "system", "content": system_prompt}])
        messages += [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": problem.answer}]
        ids, mask = chat.encode(tokenizer, messages)
        if len(ids) > seq_len:
            raise ValueError(f"a PTX sample of {len(ids)} tokens exceeds config.ptx.seq_len ({seq_len})")
        arrays["input_ids"][row, :len(ids)] = ids
        arrays["targets"][row, :len(ids) - 1] = ids[1:]
        arrays["segment_ids"][row, :len(ids)] = 1
        arrays["loss_mask"][row, :len(ids) - 1] = mask[1:]
    return arrays
