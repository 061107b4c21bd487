"""Multi-turn RL with environment rewards (kimi_jax/agentic/rl.py): an episode's token sequence is the template's
rendering of its dialogue when the sampled turns round-trip, the mask covers exactly the sampled assistant tokens,
the engine's logprobs equal the trainer's recompute on the RL batch, and one RL iteration changes the parameters
with rewards from the environment."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments.configs import rl_tiny
from experiments.configs.base import override
from kimi_jax import chat
from kimi_jax.agentic import AccountsEnv, FilesEnv, ScriptedSolver, env_accounts, env_files
from kimi_jax.agentic.environment import calls_as_text
from kimi_jax.agentic.rl import (AgenticRL, Turn, batch_arrays, episode_reward, rubric_score, run_episodes,
                                 summarize, with_agent)
from kimi_jax.agentic.tools import openai_form
from kimi_jax.chat.template import IM_END
from kimi_jax.data import ByteTokenizer

from agentic_helpers import find_task, user

TOK = ByteTokenizer()
READ_FILE = [openai_form(t) for t in env_files.TOOLS if t["function"]["name"] == "read_file"]


@dataclasses.dataclass
class Sample:
    tokens: list
    logprobs: list
    finish_reason: str = "stop"


def solver_sampler(tasks, error_rate=0.0, cut_after=None):
    """A SampleFn playing ScriptedSolver: its reply rendered as the model would write it (calls in the canonical
    layout and ids) + <|im_end|>, logprob -1 per token. cut_after: keep only that many tokens, no stop token."""
    solvers = [ScriptedSolver(task, error_rate=error_rate, seed=3) for task in tasks]

    def sample(turns: list[Turn]):
        out = []
        for turn in turns:
            reply = solvers[turn.episode].chat(turn.messages, turn.tools)
            text = calls_as_text(reply, turn.first_call_index) if reply.get("tool_calls") else reply["content"]
            tokens = TOK.encode(text + IM_END, allow_special=True)
            if cut_after is not None:
                tokens = tokens[:cut_after]
            out.append(Sample(tokens, [-1.0] * len(tokens), "stop" if cut_after is None else "length"))
        return out
    return sample


def test_episode_tokens_are_the_templates_rendering_of_the_dialogue():
    """Scripted turns (mistakes included: malformed calls, unknown tools, wrong arguments) and a multi-turn task
    whose simulated user answers: each episode's ids are chat.encode of its whole dialogue and its mask is
    chat.encode's assistant mask (the sampled tokens, stop token included); rewards are the environment's."""
    tasks = [env_files.make_task(0, i) for i in range(4)]
    tasks.append(find_task(env_accounts.make_task, lambda t: t.persona is not None))
    envs = [FilesEnv(max_turns=8) for _ in tasks[:-1]] + [AccountsEnv(max_turns=8, user=user())]
    episodes = run_episodes(solver_sampler(tasks, error_rate=0.3), TOK, tasks, envs, seeds=range(5), max_tokens=256,
                            max_len=8192)
    assert sum(len(e.turns) for e in episodes) > 12 and any(e.trajectory.errors for e in episodes)
    assert any(m["role"] == "user" for m in episodes[-1].trajectory.messages[2:])      # the user answered
    for episode in episodes:
        ids, mask = chat.encode(TOK, episode.trajectory.messages, episode.trajectory.tools)
        assert episode.tokens == ids and episode.mask == mask
        assert len(episode.logprobs) == len(ids)
        assert [x for x, m in zip(episode.logprobs, mask) if m] == [-1.0] * sum(mask)
        assert all(turn["rendered_as_sampled"] for turn in episode.turns)
        assert episode_reward(episode) == episode.trajectory.reward
        assert episode.trajectory.done and not episode.cut
    assert sum(episode_reward(e) for e in episodes) >= 1
    report = summarize(episodes)
    assert report["rendered_as_sampled"] == 1.0 and report["episodes"] == 5
    assert report["malformed_call_rate"] == pytest.approx(
        sum(len(e.trajectory.errors) for e in episodes) / report["calls_attempted"])


def test_a_cut_turn_is_closed_as_context_and_long_episodes_stop_at_max_len():
    task = env_files.make_task(0, 0)
    (episode,) = run_episodes(solver_sampler([task], cut_after=30), TOK, [task], [FilesEnv(max_turns=3)],
                              seeds=[0], max_tokens=30, max_len=4096)
    im_end = TOK.token_to_id(IM_END)
    first, second = episode.turns[:2]
    assert first["finish_reason"] == "length" and not first["rendered_as_sampled"]
    assert episode.tokens[first["start"] + 30] == im_end and episode.mask[first["start"] + 30] == 0
    sampled = [i for turn in episode.turns for i in range(turn["start"], turn["start"] + turn["length"])]
    assert np.flatnonzero(episode.mask).tolist() == sampled
    assert episode.trajectory.errors                                   # an unterminated section each turn
    assert episode.trajectory.truncated and episode_reward(episode) == 0.0

    prompt = len(chat.encode(TOK, [{"role": "system", "content": task.agent.system_prompt},
                                   {"role": "user", "content": task.prompt}], task.agent.tools, True)[0])
    (short,) = run_episodes(solver_sampler([task], cut_after=30), TOK, [task], [FilesEnv(max_turns=3)],
                            seeds=[0], max_tokens=30, max_len=prompt + 100)
    assert short.cut == "context" and len(short.turns) == 1 and short.trajectory.reward == 0.0
    with pytest.raises(ValueError, match=r"config\.rollout\.seq_len \(64\)"):
        batch_arrays([short], np.zeros((1, 1)), 64)


def test_rubric_reward_gives_partial_credit():
    task = env_files.make_task(0, 0)
    episodes = run_episodes(solver_sampler([task]), TOK, [task], [FilesEnv()], seeds=[0], max_tokens=256,
                            max_len=8192)
    assert rubric_score(task, episodes[0].trajectory) == 1.0 == episode_reward(episodes[0], "rubric")
    half = dataclasses.replace(episodes[0].trajectory, calls=episodes[0].trajectory.calls[:1], reward=0.0,
                               done=False)
    assert 0.0 < rubric_score(task, half) < 1.0


def config(**overrides):
    c = override(rl_tiny.get_config(), {
        "model.num_hidden_layers": 2, "steps": 1, "rollout.samples_per_prompt": 4, "rollout.seq_len": 640,
        "rollout.max_slots": 8, "rollout.page_size": 16, "rollout.num_pages": 192, "rollout.prefill_chunk": 128,
        "rollout.prefill_batch": 4, **overrides})
    c.agentic = ml_collections.ConfigDict({"max_tokens": 24, "enforce": False, "reward": "success",
                                           "eval_temperature": 0.0})
    return c


def test_engine_episodes_old_logp_equal_the_trainers_recompute_and_an_iteration_learns():
    """Engine rollouts (fp32, random 2-layer model, 2 tasks x 4 episodes; the tasks' goal is dropped, so finishing
    with a plain answer is success, while a malformed call gets an error observation and the episode goes on, up
    to 3 turns): old_logp equals the trainer's
    log pi on every masked position (1e-5), the mask is exactly the sampled tokens, the rewards are the
    environment's and differ, and one RL iteration changes the parameters."""
    tasks = [env_files.make_task(0, i) for i in range(40)]
    tasks = [dataclasses.replace(with_agent(t, tools=READ_FILE, system_prompt="You manage files."), goal={})
             for t in tasks if t.solution[0]["name"] == "read_file"][:2]
    rl = AgenticRL(config(), lambda t: FilesEnv(max_turns=3))
    before = jax.tree.map(lambda x: np.array(x, copy=True), rl.params())
    with pytest.raises(ValueError, match=r"config\.rollout\.samples_per_prompt \(4\) must be a multiple"):
        rl.iteration(tasks[:1])                                        # 4 rows on 8 devices
    metrics, episodes, batch = rl.iteration(tasks)

    rewards = [e.trajectory.reward for e in episodes]
    assert batch["rewards"].reshape(-1).tolist() == rewards and len(set(rewards)) > 1
    assert max(len(e.turns) for e in episodes) >= 2                   # an observation was followed by a turn
    mask = batch["mask"] > 0
    for row, episode in enumerate(episodes):
        sampled = [i for turn in episode.turns for i in range(turn["start"], turn["start"] + turn["length"])]
        assert (np.flatnonzero(mask[row]) + 1).tolist() == sampled    # position t scores token t + 1
        assert batch["targets"][row][mask[row]].tolist() == [episode.tokens[i] for i in sampled]
    model = nnx.merge(rl.graphdef, jax.tree.map(jnp.asarray, before))       # the parameters that sampled
    logits = np.asarray(jax.jit(model)(batch["input_ids"], batch["positions"], batch["segment_ids"]), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    recomputed = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] - logz
    np.testing.assert_allclose(batch["old_logp"][mask], recomputed[mask], atol=1e-5)

    assert metrics["kl_to_old"] < 1e-6 and metrics["grad_norm"] > 0 and metrics["skipped"] == 0
    assert rl.version == 1
    after = rl.params()
    changed = [np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    assert sum(changed) > len(changed) // 2
