"""Multi-turn RL with environment rewards (K2 section 3.2; POSTTRAINING.md sections 1 and 5): the policy runs as an
agent in the tool environments through the rollout engine, and K2's policy loss (kimi_jax.rl.step, MuonClip) is
taken on whole episodes.

    rl = AgenticRL(config, make_env)              # config: experiments/configs/rl_tiny.py + an `agentic` section
    metrics = rl.iteration(tasks)                 # P tasks x K episodes -> rewards -> one (or more) RL steps
    report = rl.evaluate(held_out, enforce=True)  # success rate, malformed-call rate, partial-progress metrics

An episode (`run_episodes`) is one token sequence, built as the engine produced it:

    chat.encode(system prompt + the task's first user message, tools, add_generation_prompt=True)
    + the sampled ids of assistant turn 1 (up to and including its stop token)      mask 1, old_logp = engine's
    + the ids that render what follows it: tool results / the error observation / the user's reply, then the
      generation prompt <|im_assistant|>assistant<|im_middle|>                        mask 0
    + the sampled ids of assistant turn 2 ...

and the engine's prompt for turn t + 1 is exactly that sequence so far (context="tokens"), so the trainer scores
the very tokens the engine sampled, in the very context it sampled them in: `batch_arrays`' old_logp equals the
trainer's recompute (fp32 engine). The assistant turn is never re-rendered from its parsed content. The tokens
after a turn are the difference of two renderings, chat.encode(dialogue through the observation,
add_generation_prompt=True) minus chat.encode(dialogue through the assistant turn), so they are the template's.

How this compares with chat.encode of the whole dialogue (the template, which the SFT data and the server use):
the two are equal whenever each sampled turn is what the template renders for the message the environment
recorded (a well-formed turn in the canonical layout, ended by <|im_end|>), which `tests/agentic/
test_agentic_rl.py` checks on scripted episodes. They differ where the model's bytes do not round-trip: a turn
cut at max_tokens has no <|im_end|> (one is appended as context, mask 0), a turn ended by EOS keeps its EOS
(the template would write <|im_end|>), invalid UTF-8 or a special token spelled out in bytes decodes and
re-encodes differently, whitespace between calls is dropped by the parser. Each turn records whether it matched
(`turns[i]["rendered_as_sampled"]`; summarize() reports the share). context="render" instead re-renders the
whole dialogue for every turn as the server does (what a deployed agent sees); its episodes are for evaluation
only (no training sequence).

Rewards: "success" is the environment's final reward (1.0 iff the episode ended with the goal's end state
reached, not truncated; an episode stopped because its next turn would not fit seq_len gets 0); "rubric" is
partial credit, the mean of (share of the rubric's expected tools called, share of its checkpoints hit,
success). With the enforcer on, sampling is constrained but old_logp stays the model's own logprob of each
sampled token (the engine reports the unconstrained policy), so the loss's log ratio is the policy's.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax import chat, sharding
from kimi_jax.agentic.backends import EngineBackend, ScriptedBackend, reply_message
from kimi_jax.agentic.environment import Environment
from kimi_jax.agentic.judge import judge, scripted_judge
from kimi_jax.agentic.rollout import Trajectory
from kimi_jax.agentic.tasks import Task
from kimi_jax.chat.template import IM_END

CONTEXTS = ("tokens", "render")
REWARDS = ("success", "rubric")
SEED_LIMIT = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Turn:
    """One assistant turn to sample: the prompt ids, the dialogue they render (messages, tools), the number of
    calls earlier in the episode (the next canonical call index) and the sampling seed."""

    episode: int
    prompt: list[int]
    messages: list[dict]
    tools: list[dict]
    first_call_index: int
    seed: int


SampleFn = Callable[[list[Turn]], list[Any]]    # -> one object with .tokens, .logprobs, .finish_reason per turn


@dataclasses.dataclass
class Episode:
    """An episode's trajectory (as the environment recorded it, for the judge and the metrics) and its token
    sequence: tokens, mask (1 exactly on the sampled assistant tokens) and logprobs (the engine's, 0 off the
    mask), all of one length; empty with context="render". turns: per assistant turn {"start", "length",
    "finish_reason", "errors", "calls", "rendered_as_sampled"}. cut: "context" when the episode stopped because
    its next turn would not fit max_len."""

    task: Task
    trajectory: Trajectory
    tokens: list[int]
    mask: list[int]
    logprobs: list[float]
    turns: list[dict] = dataclasses.field(default_factory=list)
    cut: str | None = None


def with_agent(task: Task, *, tools: Sequence[dict] | None = None, system_prompt: str | None = None) -> Task:
    """The task with another toolset and/or system prompt (e.g. a small toolset that keeps episodes short)."""
    agent = task.agent
    if tools is not None:
        agent = dataclasses.replace(agent, tools=tuple(tools))
    if system_prompt is not None:
        agent = dataclasses.replace(agent, system_prompt=system_prompt)
    return dataclasses.replace(task, agent=agent)


def engine_sampler(backend: EngineBackend) -> SampleFn:
    """The SampleFn of an EngineBackend: every turn of a round in one engine run (enforcer per the backend)."""
    def sample(turns: list[Turn]) -> list[Any]:
        return backend.generate([t.prompt for t in turns], [t.tools for t in turns],
                                first_call_indices=[t.first_call_index for t in turns], seeds=[t.seed for t in turns])
    return sample


def _turn_seed(seed: int, turn: int) -> int:
    return int((int(seed) + 7919 * turn) % SEED_LIMIT)


def run_episodes(sample_fn: SampleFn, tokenizer, tasks: Sequence[Task], envs: Sequence[Environment], *,
                 seeds: Sequence[int], max_tokens: int, max_len: int, context: str = "tokens") -> list[Episode]:
    """Run one episode of tasks[i] in envs[i] for every i, all at once: each round samples the next assistant
    turn of every running episode (one sample_fn call), then steps the environments. max_tokens: the turn budget
    the sampler uses; an episode whose next prompt + max_tokens would exceed max_len stops there (cut "context",
    not done, reward 0). context: "tokens" (the episode's own token sequence, module docstring) or "render"."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    if not len(tasks) == len(envs) == len(seeds):
        raise ValueError(f"tasks, envs and seeds differ in length: {len(tasks)}, {len(envs)}, {len(seeds)}")
    stop_ids = tuple(chat.stop_token_ids(tokenizer))
    im_end = tokenizer.token_to_id(IM_END)
    episodes, prompts, active = [], [], []
    for i, (task, env) in enumerate(zip(tasks, envs)):
        messages = [{"role": "system", "content": task.agent.system_prompt}] + env.reset(task)
        tools = list(task.agent.tools)
        prompt = chat.encode(tokenizer, messages, tools, add_generation_prompt=True)[0]
        episode = Episode(task, Trajectory(task.task_id, messages, tools), [], [], [])
        if context == "tokens":
            episode.tokens, episode.mask, episode.logprobs = list(prompt), [0] * len(prompt), [0.0] * len(prompt)
        episodes.append(episode)
        prompts.append(prompt)
        if len(prompt) + max_tokens > max_len:
            _cut(episode)
        else:
            active.append(i)
    while active:
        turns = [Turn(i, prompts[i], list(episodes[i].trajectory.messages), episodes[i].trajectory.tools,
                      envs[i].n_calls, _turn_seed(seeds[i], len(episodes[i].turns))) for i in active]
        samples = sample_fn(turns)
        still = []
        for i, turn, sample in zip(active, turns, samples):
            episode, env, trajectory = episodes[i], envs[i], episodes[i].trajectory
            tokens, logprobs = [int(t) for t in sample.tokens], [float(x) for x in sample.logprobs]
            if len(tokens) != len(logprobs):
                raise ValueError(f"the sampler gave {len(tokens)} tokens but {len(logprobs)} logprobs")
            record = {"start": len(episode.tokens), "length": len(tokens), "finish_reason": sample.finish_reason}
            if context == "tokens":
                episode.tokens += tokens
                episode.mask += [1] * len(tokens)
                episode.logprobs += logprobs
            before = len(trajectory.messages)
            observation, reward, done, info = env.step(reply_message(tokenizer, tokens, stop_ids, turn.tools))
            trajectory.messages.append(info["assistant"])
            trajectory.messages.extend(observation)
            trajectory.calls.extend(info["calls"])
            trajectory.errors.extend(info["errors"])
            trajectory.reward, trajectory.done, trajectory.truncated = reward, done, info["truncated"]
            trajectory.goal_failures = info.get("goal_failures", [])
            through_turn = chat.encode(tokenizer, trajectory.messages[:before + 1], turn.tools)[0]
            rendered_prompt = len(chat.encode(tokenizer, trajectory.messages[:before], turn.tools,
                                              add_generation_prompt=True)[0])
            record.update(errors=len(info["errors"]), calls=len(info["calls"]),
                          rendered_as_sampled=through_turn[rendered_prompt:] == tokens)
            episode.turns.append(record)
            if done:
                continue
            full = chat.encode(tokenizer, trajectory.messages, turn.tools, add_generation_prompt=True)[0]
            if context == "tokens":
                if full[:len(through_turn)] != through_turn:
                    raise AssertionError("the rendering of a dialogue is not a prefix of its continuation")
                closing = [] if tokens and tokens[-1] in stop_ids else [im_end]
                nxt = episode.tokens + closing + full[len(through_turn):]
            else:
                nxt = full
            if len(nxt) + max_tokens > max_len:
                _cut(episode)
                continue
            if context == "tokens":
                added = len(nxt) - len(episode.tokens)
                episode.tokens, episode.mask, episode.logprobs = nxt, episode.mask + [0] * added, \
                    episode.logprobs + [0.0] * added
            prompts[i] = nxt
            still.append(i)
        active = still
    return episodes


def _cut(episode: Episode) -> None:
    episode.cut = "context"
    episode.trajectory.truncated = True
    episode.trajectory.reward = 0.0


# ------------------------------------------------------------------------------------------- rewards and metrics
def rubric_score(task: Task, trajectory: Trajectory) -> float:
    """Partial credit: mean of (share of rubric.expected_tools called, share of rubric.checkpoints hit, success)."""
    return float(np.mean([_tools_share(task, trajectory), _checkpoint_share(task, trajectory),
                          _success(trajectory)]))


def episode_reward(episode: Episode, kind: str = "success") -> float:
    if kind == "success":
        return float(episode.trajectory.reward)
    if kind == "rubric":
        return rubric_score(episode.task, episode.trajectory)
    raise ValueError(f"config.agentic.reward must be one of {REWARDS}, got {kind!r}")


def _success(trajectory: Trajectory) -> float:
    return float(trajectory.done and not trajectory.truncated and trajectory.reward >= 1.0)


def _tools_share(task: Task, trajectory: Trajectory) -> float:
    expected = task.rubric.expected_tools
    called = {c["name"] for c in trajectory.calls}
    return sum(t in called for t in expected) / len(expected) if expected else 1.0


def _checkpoint_share(task: Task, trajectory: Trajectory) -> float:
    points = task.rubric.checkpoints
    hit = [any(p.hit_by(c["name"], c["arguments"]) for c in trajectory.calls) for p in points]
    return sum(hit) / len(points) if points else 1.0


def episode_metrics(episode: Episode) -> dict[str, float]:
    """Per episode: success (the environment's), judge_pass (rule checks + the scripted judge), finished (a final
    answer, not truncated), turns, calls (well-formed, executed), malformed (the environment's parse errors),
    first_tool_correct / first_call_correct (the first executed call has the reference solution's first tool /
    also its arguments), tools_share, checkpoint_share, sampled_tokens, cut_turns (turns that hit max_tokens)."""
    task, t = episode.task, episode.trajectory
    first = next((s for s in task.solution if "name" in s), None)
    call = t.calls[0] if t.calls else None
    tool_ok = bool(call and first and call["name"] == first["name"])
    return {
        "success": _success(t),
        "judge_pass": float(judge(task, t, ScriptedBackend(scripted_judge)).passed),
        "finished": float(t.done and not t.truncated and t.final_answer is not None),
        "turns": float(len(episode.turns)),
        "calls": float(len(t.calls)),
        "malformed": float(len(t.errors)),
        "first_tool_correct": float(tool_ok),
        "first_call_correct": float(tool_ok and all(call["arguments"].get(k) == v
                                                    for k, v in first["arguments"].items())),
        "tools_share": _tools_share(task, t),
        "checkpoint_share": _checkpoint_share(task, t),
        "rubric": rubric_score(task, t),
        "sampled_tokens": float(sum(turn["length"] for turn in episode.turns)),
        "cut_turns": float(sum(turn["finish_reason"] == "length" for turn in episode.turns)),
    }


def summarize(episodes: Sequence[Episode]) -> dict[str, float]:
    """Means over episodes of episode_metrics (success_rate, ...), plus malformed_call_rate = malformed calls /
    calls attempted (executed calls + parse errors, over all episodes; None when nothing was attempted),
    turns_with_errors (share of turns with a parse error), error_kinds (parse errors by ChatParseError kind),
    rendered_as_sampled (share of turns whose sampled ids are the template's rendering) and context_cut (share
    of episodes stopped at max_len)."""
    rows = [episode_metrics(e) for e in episodes]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
    calls, malformed = sum(r["calls"] for r in rows), sum(r["malformed"] for r in rows)
    turns = [turn for e in episodes for turn in e.turns]
    return {"episodes": len(episodes), "success_rate": mean.get("success", 0.0),
            "judge_pass_rate": mean.get("judge_pass", 0.0),
            "malformed_call_rate": malformed / (calls + malformed) if calls + malformed else None,
            "calls_attempted": calls + malformed, "well_formed_calls": calls,
            "turns_with_errors": float(np.mean([turn["errors"] > 0 for turn in turns])) if turns else 0.0,
            "rendered_as_sampled": float(np.mean([turn["rendered_as_sampled"] for turn in turns])) if turns else 0.0,
            "context_cut": float(np.mean([e.cut is not None for e in episodes])) if episodes else 0.0,
            "error_kinds": dict(sorted(collections.Counter(x["kind"] for e in episodes
                                                           for x in e.trajectory.errors).items())),
            **{k: v for k, v in mean.items() if k not in ("success", "judge_pass", "calls", "malformed")}}


# ---------------------------------------------------------------------------------------------- the RL batch
def batch_arrays(episodes: Sequence[Episode], rewards: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The RL step's rollout batch (kimi_jax/rl/step.py) of P x K episodes (row p * K + k), seq_len positions,
    right-padded: targets[t] = tokens[t + 1], mask[t] / old_logp[t] the token mask / engine logprob of tokens[t + 1]
    (position t's logits scored it). rewards [P, K]."""
    n = len(episodes)
    if rewards.size != n:
        raise ValueError(f"rewards {rewards.shape} do not match {n} episodes")
    arrays = {"input_ids": np.zeros((n, seq_len), np.int32), "targets": np.zeros((n, seq_len), np.int32),
              "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
              "segment_ids": np.zeros((n, seq_len), np.int32), "mask": np.zeros((n, seq_len), np.float32),
              "old_logp": np.zeros((n, seq_len), np.float32)}
    for row, episode in enumerate(episodes):
        tokens = episode.tokens
        if not tokens:
            raise ValueError(f"episode {row} ({episode.task.task_id}) has no token sequence (context='render' "
                             f"episodes are for evaluation only)")
        if len(tokens) > seq_len:
            raise ValueError(f"episode {row} ({episode.task.task_id}) has {len(tokens)} tokens, more than "
                             f"config.rollout.seq_len ({seq_len})")
        n_tok = len(tokens)
        arrays["input_ids"][row, :n_tok] = tokens
        arrays["targets"][row, :n_tok - 1] = tokens[1:]
        arrays["segment_ids"][row, :n_tok] = 1
        arrays["mask"][row, :n_tok - 1] = episode.mask[1:]
        arrays["old_logp"][row, :n_tok - 1] = episode.logprobs[1:]
    arrays["rewards"] = np.asarray(rewards, np.float32)
    return arrays


# ---------------------------------------------------------------------------------------------- the RL driver
class AgenticRL:
    """The trainer state (kimi_jax.rl.loop.initial_state: fresh, or config.init_workdir's newest parameters), the
    jitted RL step (kimi_jax.rl.step.make_rl_step: config.rl.loss / tau, MuonClip with QK-Clip) and the colocated
    engine (kimi_jax.rl.loop.ColocatedEngine: the trainer's parameters are synced into it as weight version
    `self.version` = the number of RL iterations done, before every rollout or evaluation that needs them).

    config: experiments/configs/rl_tiny.py's fields (seed, model, mesh, init_workdir, steps (for the optimizer's
    schedule), optimizer, train.router_bias_update_rate, data.tokenizer, rl.loss / tau / clip_eps /
    updates_per_rollout, rollout.samples_per_prompt (K) / temperature / top_p / seq_len and the engine fields)
    plus config.agentic: max_tokens (per assistant turn), enforce (the enforcer in training rollouts), reward
    ("success" or "rubric"), eval_temperature. make_env(task) -> a fresh Environment (its max_turns bounds an
    episode)."""

    def __init__(self, config, make_env: Callable[[Task], Environment]):
        from kimi_jax.data import load_tokenizer
        from kimi_jax.rl import loop as rl_loop
        from kimi_jax.rl.step import make_rl_step
        from kimi_jax.train import loop as train_loop

        if config.agentic.reward not in REWARDS:
            raise ValueError(f"config.agentic.reward must be one of {REWARDS}, got {config.agentic.reward!r}")
        self.config, self.make_env = config, make_env
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.cfg = train_loop.model_config(config.model)
        self.mesh = train_loop.make_mesh(config.mesh)
        self.graphdef, self.state, tx, lr = rl_loop.initial_state(config, self.cfg, self.mesh)
        kwargs = dict(loss=config.rl.loss, tau=config.rl.tau, clip_eps=config.rl.clip_eps,
                      router_bias_update_rate=config.train.router_bias_update_rate,
                      qk_clip_tau=config.optimizer.qk_clip_tau if config.optimizer.name == "muonclip" else None,
                      microbatches=int(config.rl.get("microbatches", 1)))
        self.step_fn = jax.jit(make_rl_step(self.graphdef, self.cfg, tx, lr, **kwargs), donate_argnums=0)
        self.engine = rl_loop.ColocatedEngine(config, self.cfg, chat.stop_token_ids(self.tokenizer))
        self.version, self.last_sync_s = 0, 0.0
        self._sharding = NamedSharding(self.mesh, sharding.logical_to_spec(("batch", "seq"), self.mesh))

    def episodes(self, tasks: Sequence[Task], *, samples: int = 1, seed: Sequence[int] | int = 0,
                 enforce: bool = False, temperature: float = 1.0, context: str = "tokens") -> list[Episode]:
        """`samples` episodes of each task (task p's in rows p * samples ...) from the current parameters."""
        a, r = self.config.agentic, self.config.rollout
        flat = [task for task in tasks for _ in range(samples)]
        seeds = np.random.default_rng(seed).integers(0, SEED_LIMIT, len(flat))

        def rollout(engine):
            backend = EngineBackend(engine, self.tokenizer, max_tokens=a.max_tokens, temperature=temperature,
                                    top_p=r.top_p, enforce=enforce)
            return run_episodes(engine_sampler(backend), self.tokenizer, flat, [self.make_env(t) for t in flat],
                                seeds=seeds, max_tokens=a.max_tokens, max_len=r.seq_len, context=context)

        self.state, out, self.last_sync_s = self.engine.run(self.state, self.version, rollout)
        return out

    def evaluate(self, tasks: Sequence[Task], *, enforce: bool, seed: int = 0) -> dict[str, float]:
        """One episode per task at config.agentic.eval_temperature, dialogues re-rendered every turn as the server
        does (context "render") -> summarize()."""
        start = time.perf_counter()
        episodes = self.episodes(tasks, seed=[self.config.seed, 4, seed], enforce=enforce,
                                 temperature=self.config.agentic.eval_temperature, context="render")
        return {**summarize(episodes), "eval_s": time.perf_counter() - start}

    def params(self):
        return self.state.params

    def iteration(self, tasks: Sequence[Task]) -> tuple[dict[str, float], list[Episode], dict[str, np.ndarray]]:
        """One RL iteration on P = len(tasks) tasks: K episodes each (context "tokens", config.agentic.enforce),
        rewards, config.rl.updates_per_rollout RL steps -> (metrics, episodes, the batch)."""
        c = self.config
        k = c.rollout.samples_per_prompt
        divisor = sharding.batch_divisor(self.mesh)
        if (len(tasks) * k) % divisor:
            raise ValueError(f"tasks per iteration ({len(tasks)}) x config.rollout.samples_per_prompt ({k}) must be a "
                             f"multiple of the mesh's batch split ({divisor})")
        start = time.perf_counter()
        episodes = self.episodes(tasks, samples=k, seed=[c.seed, 3, self.version], enforce=c.agentic.enforce,
                                 temperature=c.rollout.temperature)
        rollout_s = time.perf_counter() - start - self.last_sync_s
        rewards = np.array([episode_reward(e, c.agentic.reward) for e in episodes], np.float32).reshape(len(tasks), k)
        batch = batch_arrays(episodes, rewards, c.rollout.seq_len)
        put = lambda x: jax.make_array_from_process_local_data(self._sharding, x)
        device_batch = {key: put(v) for key, v in batch.items() if key != "rewards"}
        device_batch["rewards"] = jax.device_put(batch["rewards"], NamedSharding(self.mesh, P()))
        start = time.perf_counter()
        for _ in range(c.rl.updates_per_rollout):
            self.state, step_metrics = self.step_fn(self.state, device_batch)
        step_metrics = {key: np.asarray(v).item() for key, v in jax.device_get(step_metrics).items()}
        train_s = time.perf_counter() - start
        self.version += 1
        metrics = {**step_metrics, "reward": float(rewards.mean()),
                   "reward_std_within_task": float(rewards.std(1).mean()),
                   **{f"rollout_{key}": v for key, v in summarize(episodes).items()},
                   "masked_tokens": int(batch["mask"].sum()), "rollout_s": rollout_s, "train_s": train_s,
                   "sync_s": self.last_sync_s}
        return metrics, episodes, batch
