"""The RL loop (kimi_jax/rl/loop.py) on the tiny preset: the metrics it logs, an exact resume after SIGTERM, and a
trivially learnable reward that RL with K2's loss learns."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.configs import rl_tiny
from experiments.configs.base import override
from kimi_jax import chat, create_model
from kimi_jax.data import load_tokenizer
from kimi_jax.rl import rollout
from kimi_jax.rl.loop import check_config, initial_state, train_rl
from kimi_jax.rl.rewards import score
from kimi_jax.rl.sampler import PromptSampler, pass_at_k, temperature
from kimi_jax.rl.tasks import Reward, arithmetic, generate, in_held_out
from kimi_jax.serve import Engine, EngineConfig
from kimi_jax.train import loop
from kimi_jax.train.checkpointing import restore_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMING = {"time", "sync_s", "rollout_tokens_per_s", "train_tokens_per_s"}
SMALL = {"model.num_hidden_layers": 2, "prompts.per_step": 4, "rollout.samples_per_prompt": 4,
         "rollout.max_slots": 16, "rollout.budgets": {"arithmetic": 8}, "rollout.seq_len": 48, "ptx.seq_len": 48,
         "ptx.weight": 0.1, "eval.every": 2, "eval.num_prompts": 4, "eval.samples": 4, "eval.k": 2}


def small_config(**overrides):
    return override(rl_tiny.get_config(), {**SMALL, "steps": 3, **overrides})


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timing(lines):
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rl") / "run")
    return workdir, train_rl(small_config(), workdir)


def test_logs_every_metric(uninterrupted):
    workdir, summary = uninterrupted
    lines = read_metrics(workdir)
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    heldout = {"heldout_pass@1", "heldout_pass@2", "heldout_response_length"}
    assert set(lines[0]) == heldout | {"step", "time"}
    per_step = {"reward", "shaped_reward", "response_length", "truncated_share", "excluded", "kl_to_old",
                "kl_after_update", "entropy", "grad_norm", "loss", "policy_loss", "ptx_loss", "lr",
                "max_attention_logit", "clipped_head_share", "skipped", "temperature", "weight_version",
                "rollout_tokens_per_s", "train_tokens_per_s", "sync_s", "step", "time"}
    assert set(lines[1]) == per_step and set(lines[2]) == set(lines[3]) == per_step | heldout
    assert [line["weight_version"] for line in lines[1:]] == [0, 1, 2]
    assert [line["temperature"] for line in lines[1:]] == pytest.approx([1.0, 0.998, 0.996])
    for line in lines[1:]:
        assert 1 <= line["response_length"] <= 8 and 0 <= line["truncated_share"] <= 1
        assert line["kl_to_old"] < 1e-6          # the engine's logprobs are the trainer's (fp32 engine, 1 update)
        assert line["kl_after_update"] > 0 and line["grad_norm"] > 0 and line["ptx_loss"] > 0
        assert line["rollout_tokens_per_s"] > 0 and line["train_tokens_per_s"] > 0
        # shaped reward = score - 0.5 * truncated (no length reward)
        assert line["shaped_reward"] == pytest.approx(line["reward"] - 0.5 * line["truncated_share"], abs=1e-6)
    assert summary["step"] == 3 and summary["heldout_pass@1"] == lines[3]["heldout_pass@1"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]


def test_resumes_exactly_after_sigterm(uninterrupted, tmp_path):
    """SIGTERM during iteration 2's rollout: the run saves after iteration 2 and stops; rerun, it resumes and
    logs iteration 3 exactly as the uninterrupted run did (sampler state, engine weight version, train state)."""
    calls = []

    def reward_sending_sigterm(problems, responses):
        if not in_held_out(problems[0].key):      # a training rollout, not an eval
            calls.append(len(calls) + 1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return score(problems, responses)

    workdir = str(tmp_path / "run")
    stopped = train_rl(small_config(), workdir, reward_fn=reward_sending_sigterm)
    assert stopped["step"] == 2 and [line["step"] for line in read_metrics(workdir)] == [0, 1, 2]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    resumed = train_rl(small_config(), workdir)
    assert resumed["step"] == 3
    expected = without_timing(read_metrics(uninterrupted[0]))
    assert without_timing(read_metrics(workdir)) == expected


@pytest.mark.slow
def test_resumes_exactly_after_kill_9(uninterrupted, tmp_path):
    """launch/rl.py in a subprocess, SIGKILLed once iteration 2's checkpoint is on disk (no chance to save or
    clean up), then rerun: it resumes from the newest complete checkpoint, drops the metrics lines logged after
    it, and logs the same rewards, losses and held-out numbers as the uninterrupted run."""
    workdir = str(tmp_path / "run")
    flat = {"rollout.budgets.arithmetic": 8, **{k: v for k, v in SMALL.items() if k != "rollout.budgets"},
            "steps": 3, "checkpoint_every": 1}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "rl.py"), f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in flat.items())]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not os.path.isdir(os.path.join(workdir, "checkpoints", "2")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert without_timing(read_metrics(workdir)) == without_timing(read_metrics(uninterrupted[0]))


def test_init_workdir_starts_from_its_newest_parameters(uninterrupted):
    """config.init_workdir: the policy starts from that run's newest parameters, with a fresh optimizer."""
    workdir, _ = uninterrupted
    config = small_config(init_workdir=workdir)
    cfg = loop.model_config(config.model)
    _, state, _, _ = initial_state(config, cfg, loop.make_mesh(config.mesh))
    expected = nnx.to_pure_dict(nnx.state(restore_model(workdir)))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 1)


def first_letter_reward(problems, responses):
    """1 when the response starts with a lowercase ASCII letter (about 1 in 10 tokens at random init)."""
    return [Reward(float(bool(r) and "a" <= r[0] <= "z"), "") for r in responses]


@pytest.mark.slow
def test_k2_loss_learns_a_trivial_reward(tmp_path):
    config = override(rl_tiny.get_config(), {
        "steps": 12, "model.num_hidden_layers": 2, "prompts.per_step": 8, "rollout.samples_per_prompt": 8,
        "rollout.budgets": {"arithmetic": 2}, "rollout.seq_len": 40, "rollout.budget_penalty": 0.0,
        "rollout.temperature_decay_steps": 0, "optimizer.learning_rate": 1e-2, "eval.every": 0,
        "checkpoint_every": 100})
    train_rl(config, str(tmp_path / "run"), reward_fn=first_letter_reward)
    rewards = [line["reward"] for line in read_metrics(str(tmp_path / "run"))]
    assert len(rewards) == 12
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.5, rewards     # seen: 0.12, 0.14, 0.25 ... 1.0


@pytest.mark.parametrize("overrides, field", [
    ({"rl.updates_per_rollout": 0}, "config.rl.updates_per_rollout"),
    ({"rl.tau": 0.0}, "config.rl.tau"),
    ({"prompts.family": "chess"}, "config.prompts.family"),
    ({"eval.k": 5}, "config.eval.k"),
    ({"ptx.weight": -1.0}, "config.ptx.weight"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_config(small_config(**overrides))


def test_pool_larger_than_the_task_names_the_field(tmp_path):
    assert len(generate(arithmetic, 0, 150, difficulty=1)) == 150
    with pytest.raises(ValueError, match=r"config\.prompts\.pool_size"):
        train_rl(small_config(**{"prompts.pool_size": 1000}), str(tmp_path / "run"))


def test_engine_logprobs_equal_the_trainers_recompute_on_the_batch():
    """A real rollout through the engine (fp32, one device), laid out by batch_arrays: old_logp equals the
    trainer's log pi(targets) on every masked position (1e-5), the mask covers exactly the response tokens
    (their last one the stop token when the sample stopped), and targets are input_ids shifted by one."""
    cfg = loop.model_config(small_config().model)
    model = create_model(cfg, seed=0)
    tokenizer = load_tokenizer("byte")
    engine = Engine(model, EngineConfig(max_slots=8, page_size=8, num_pages=64, max_seq_len=48),
                    stop_token_ids=chat.stop_token_ids(tokenizer))
    problems = generate(arithmetic, 0, 2, difficulty=1)
    out = rollout.sample(engine, tokenizer, problems, samples_per_prompt=3, budgets={"arithmetic": 12},
                         temperature=1.0, top_p=1.0, seeds=[5, 9], system_prompt="", reward_fn=score)
    shaped, scored = rollout.shaped_rewards(out, penalty=0.5, length_weight=0.0)
    batch = rollout.batch_arrays(out, shaped, scored, 48)
    logits = np.asarray(jax.jit(model)(batch["input_ids"], batch["positions"], batch["segment_ids"]), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    recomputed = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] - logz
    mask = batch["mask"] > 0
    np.testing.assert_allclose(batch["old_logp"][mask], recomputed[mask], atol=1e-5)
    for row, (prompt, response) in enumerate(zip(out.prompts, out.responses)):
        assert np.flatnonzero(mask[row]).tolist() == list(range(len(prompt) - 1, len(prompt) + len(response) - 1))
        assert batch["targets"][row][mask[row]].tolist() == response
        assert (response[-1] in engine.stop_token_ids) != out.truncated.reshape(-1)[row]
    np.testing.assert_array_equal(batch["targets"][:, :-1][batch["segment_ids"][:, 1:] > 0],
                                  batch["input_ids"][:, 1:][batch["segment_ids"][:, 1:] > 0])
    assert prompt[-3:] == tokenizer.encode("<|im_assistant|>assistant<|im_middle|>", allow_special=True)[-3:]


def test_shaped_rewards_penalise_truncation_and_leave_unscored_samples_out():
    """Scores [[1, 0, None], [None, None, None]], sample (0, 1) truncated, penalty 0.5; the unscored samples take
    their prompt's mean score (0.5, then 0 for a prompt without scores) and lose their mask."""
    out = rollout.Rollout(problems=[], prompts=[[1, 2]] * 6, responses=[[3, 4], [5, 6, 7], [8]] * 2,
                          logprobs=[[-1.0, -2.0], [-1.0, -1.0, -1.0], [-3.0]] * 2, texts=[""] * 6,
                          truncated=np.array([[False, True, False], [False, False, True]]),
                          scores=[1.0, 0.0, None, None, None, None], samples_per_prompt=3)
    shaped, scored = rollout.shaped_rewards(out, penalty=0.5, length_weight=0.0)
    np.testing.assert_allclose(shaped, [[1.0, -0.5, 0.5], [0.0, 0.0, 0.0]])
    assert scored.tolist() == [[True, True, False], [False, False, False]]
    batch = rollout.batch_arrays(out, shaped, scored, 6)
    assert batch["mask"].tolist()[:3] == [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0] * 6]
    assert batch["old_logp"][1].tolist() == [0, -1, -1, -1, 0, 0] and batch["mask"][3:].sum() == 0
    with_length = rollout.shaped_rewards(out, penalty=0.0, length_weight=0.1)[0]
    # k1.5 over the lengths of prompt 0 (2, 3, 1): lambda = 0, -0.5, 0.5; correct: sample 0 only
    np.testing.assert_allclose(with_length[0], [1.0 + 0.0, 0.0 - 0.05, 0.5 + 0.0])
    with pytest.raises(ValueError, match=r"config\.rollout\.seq_len"):
        rollout.batch_arrays(out, shaped, scored, 4)


def test_prioritised_sampler_prefers_unsolved_prompts_and_its_state_resumes():
    pool = generate(arithmetic, 0, 20, difficulty=1)
    sampler = PromptSampler(pool, "prioritised", seed=3)
    sampler.record(list(range(10)), np.ones((10, 4), bool))        # problems 0..9 always solved
    draws = np.array([sampler.draw(i, 5) for i in range(200)])
    assert (draws < 10).mean() < 0.01 and len(set(draws[0])) == 5
    restored = PromptSampler(pool, "prioritised", seed=3)
    restored.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert restored.draw(7, 5) == sampler.draw(7, 5)
    uniform = np.array([PromptSampler(pool, "uniform", seed=3).draw(i, 5) for i in range(200)])
    assert 0.4 < (uniform < 10).mean() < 0.6
    with pytest.raises(ValueError, match=r"config\.prompts\.sampling"):
        PromptSampler(pool, "greedy")
    with pytest.raises(ValueError, match=r"config\.prompts\.per_step"):
        sampler.draw(0, 21)


def test_temperature_schedule_and_pass_at_k():
    assert [temperature(i, start=1.0, end=0.6, decay_steps=4) for i in (0, 1, 4, 9)] == pytest.approx(
        [1.0, 0.9, 0.6, 0.6])
    assert temperature(50, start=0.9, end=0.1, decay_steps=0) == 0.9
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)          # 1 - C(3, 2) / C(4, 2)
