"""The self-critique rubric reward (kimi_jax/rl/critic.py): the critic prompt, preferences read from the two choice
tokens against a full forward, the rubric reward, the Bradley-Terry loss and training, and the RL loop with the
critic enabled."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import rl_tiny
from experiments.configs.base import override
from kimi_jax import create_model
from kimi_jax.config import PRESETS
from kimi_jax.data import load_tokenizer
from kimi_jax.rl import critic as C
from kimi_jax.rl.loop import check_config, train_rl
from kimi_jax.rl.rewards import score
from kimi_jax.rl.tasks import Problem, arithmetic, generate, in_held_out
from kimi_jax.train.step import TrainState

SHORT = C.Rubrics(core="- clear, relevant, correct", prescriptive="- no praise, no self-justification")
PAIRS = [("3+4=", "7", "8"), ("12-5=", "7", "Good question! 6"), ("2+2=", "4", "22"), ("9-9=", "0", "<|im_end|>1")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("byte")


@pytest.fixture(scope="module")
def model():
    """The tiny preset at random init, its lm_head redrawn at unit scale so choice probabilities are far from 1/2."""
    model = create_model(PRESETS["tiny"](), seed=0)
    kernel = model.lm_head.kernel
    kernel[...] = jax.random.normal(jax.random.key(1), kernel[...].shape, kernel[...].dtype)
    return model


def full_forward_p_a(model, tokenizer, prompt, first, second):
    """p_A of one critic prompt from the model's full forward (no padding, all logits), float64."""
    ids = C.critic_prompt_ids(tokenizer, prompt, first, second, SHORT)
    logits = np.asarray(jax.jit(model)(jnp.asarray([ids])), np.float64)[0, -1]
    a, b = logits[65], logits[66]                         # "A", "B" in the byte tokenizer
    return np.exp(a) / (np.exp(a) + np.exp(b))


def test_prompt_renders_rubrics_prompt_and_both_responses_in_the_chat_format(tokenizer):
    text = C.critic_prompt("3+4=", "7", "Good question! <|im_end|>8", SHORT)
    assert text.startswith("<|im_system|>system<|im_middle|><|im_end|><|im_user|>user<|im_middle|>")
    assert text.endswith("<|im_end|><|im_assistant|>assistant<|im_middle|>")
    body = text.split("<|im_user|>user<|im_middle|>")[1]
    for part in ("Answer with one letter", "Core rubrics:\n- clear, relevant, correct",
                 "Prescriptive rubrics:\n- no praise", "Prompt:\n3+4=", "Response A:\n7",
                 "Response B:\nGood question! < |im_end|>8"):
        assert part in body
    ids = C.critic_prompt_ids(tokenizer, "3+4=", "7", "Good question! <|im_end|>8", SHORT)
    assert ids == tokenizer.encode(text, allow_special=True)
    assert ids.count(tokenizer.token_to_id("<|im_end|>")) == 2          # the system and user turns' ends only
    assert C.choice_token_ids(tokenizer) == (65, 66)
    default = C.critic_prompt("q", "a", "b")
    assert "Clarity and relevance" in default and "No initial praise" in default

    class TwoTokenLetters:
        def encode(self, text, allow_special=False):
            return [1, 2]
    with pytest.raises(ValueError, match="must be one"):
        C.choice_token_ids(TwoTokenLetters())


def test_preference_equals_a_full_forward_hand_computation(model, tokenizer):
    """P(a beats b) = mean over both orders of the probability the critic picks a, from the full-forward logits
    of each unpadded prompt; the critic's batched forward pads them into one bucket."""
    got = C.preference(model, tokenizer, PAIRS, rubrics=SHORT)
    first = np.array([full_forward_p_a(model, tokenizer, q, a, b) for q, a, b in PAIRS])
    second = np.array([full_forward_p_a(model, tokenizer, q, b, a) for q, a, b in PAIRS])
    np.testing.assert_allclose(got, 0.5 * (first + 1 - second), atol=1e-6)
    graphdef, state = nnx.split(model)
    critic = C.Critic(graphdef, tokenizer, rubrics=SHORT, length_bucket=32, max_rows=4)   # 2 forwards of 4 rows
    params = nnx.to_pure_dict(state)
    p_first = critic.p_first(params, [(q, a, b) for q, a, b in PAIRS] + [(q, b, a) for q, a, b in PAIRS])
    np.testing.assert_allclose(p_first, np.concatenate([first, second]), atol=1e-6)
    assert np.abs(first - 0.5).min() > 0.05                      # each order's choice is far from a coin flip
    forward = critic.preference(params, PAIRS)
    np.testing.assert_allclose(forward, got, atol=1e-6)
    backward = critic.preference(params, [(q, b, a) for q, a, b in PAIRS])
    assert np.all(forward + backward == 1.0)                     # exactly, by construction
    assert np.all(critic.preference(params, [(q, a, a) for q, a, _ in PAIRS]) == 0.5)


def test_rubric_rewards_are_the_mean_off_diagonal_win_probability(model, tokenizer):
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    critic = C.Critic(graphdef, tokenizer, rubrics=SHORT)
    prompts = ["3+4=", "9-2="]
    responses = [["7", "8", "Good question! 7"], ["7", "7", "x"]]
    matrix = critic.preference_matrix(params, prompts, responses)
    index = [(p, i, j) for p in range(2) for i in range(3) for j in range(3) if i != j]
    pairwise = critic.preference(params, [(prompts[p], responses[p][i], responses[p][j]) for p, i, j in index])
    for (p, i, j), want in zip(index, pairwise):
        assert matrix[p, i, j] == pytest.approx(want, abs=1e-6)
    assert np.all(np.diagonal(matrix, axis1=1, axis2=2) == 0.5)
    assert np.all(matrix + np.swapaxes(matrix, 1, 2) == 1.0)
    assert matrix[1, 0, 1] == 0.5                                  # identical responses tie
    rewards = critic.rubric_rewards(params, prompts, responses)
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(rewards, [[m[i][off[i]].mean() for i in range(3)] for m in matrix], atol=1e-12)
    assert rewards.shape == (2, 3)


def test_bt_losses_equal_numpy_references():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 2)).astype(np.float32) * 3
    labels = np.array([0, 1, 0, 1, 0, 1], np.int32)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    nll = -log_softmax[np.arange(6), labels]
    assert float(C.bt_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))) == pytest.approx(
        (nll * weights).sum() / weights.sum(), rel=1e-6)
    assert float(C.bt_loss(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(nll.mean(), rel=1e-6)
    margin = (logits[:, 0] - logits[:, 1]) * (1 - 2 * labels)             # -log sigmoid of the label's margin
    np.testing.assert_allclose(nll, np.log1p(np.exp(-margin)), rtol=1e-5)
    d = logits[:, 0] - logits[:, 1]                                       # paired: rows (a, b), (b, a)
    paired = np.log1p(np.exp(-(d[0::2] - d[1::2]) / 2))
    assert float(C.paired_bt_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))) == pytest.approx(
        paired[:2].mean(), rel=1e-6)
    unbiased = np.stack([logits[0::2], logits[0::2][:, ::-1]], 1).reshape(6, 2)     # d(b, a) = -d(a, b)
    assert float(C.paired_bt_loss(jnp.asarray(unbiased), jnp.asarray(labels))) == pytest.approx(
        float(C.bt_loss(jnp.asarray(unbiased), jnp.asarray(labels))), rel=1e-6)
    biased = logits + np.array([5.0, 0.0], np.float32)                    # a constant pull toward "A" cancels
    assert float(C.paired_bt_loss(jnp.asarray(biased), jnp.asarray(labels))) == pytest.approx(
        float(C.paired_bt_loss(jnp.asarray(logits), jnp.asarray(labels))), rel=1e-5)


TINY_FORMAT = C.Rubrics(core="-", prescriptive="-", instruction="A or B?")


def test_bt_training_moves_preferences_to_the_labels(tokenizer):
    """A 2-layer tiny critic at random init, BT steps ("paired") on 4 fixed (better, worse) pairs: the loss's
    descent direction raises every pair's preference for its better response (first order), and 40
    Adam steps take every pair's preference above 0.9 (accuracy 1.0)."""
    cfg = PRESETS["tiny"]().replace(num_hidden_layers=2)
    graphdef, state = nnx.split(create_model(cfg, seed=3))
    params = nnx.to_pure_dict(state)
    critic = C.Critic(graphdef, tokenizer, rubrics=TINY_FORMAT, length_bucket=16)
    pairs = [("3+4=", "7", "8"), ("5-1=", "4", "41"), ("2+6=", "8", "Good question! 8"), ("1+1=", "2", "x")]
    batch = critic.bt_batch(pairs)
    assert batch["labels"].tolist() == [0, 1] * 4 and batch["weights"].sum() == 8
    before = critic.preference(params, pairs)

    def run(tx, steps):
        zero = jnp.zeros((), jnp.int32)
        step = jax.jit(C.make_critic_step(graphdef, cfg, tx, lambda _: 0.0, critic.choice_ids))
        s = TrainState(zero, params, tx.init(params), zero, zero)
        losses = []
        for _ in range(steps):
            s, metrics = step(s, batch)
            losses.append(float(metrics["critic_loss"]))
        return s.params, losses

    # the gradient's sign: along -grad(loss), the labelled responses' preferences rise (first order)
    forward = C.choice_logits_fn(graphdef, critic.choice_ids)
    loss_fn = C.make_critic_loss(graphdef, critic.choice_ids)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch)[0]))(params)

    def preferences(p):
        d = forward(p, batch)[0] @ jnp.array([1.0, -1.0])
        return 0.5 * (jax.nn.sigmoid(d[0::2]) + jax.nn.sigmoid(-d[1::2]))

    value, slope = jax.jit(lambda p, t: jax.jvp(preferences, (p,), (t,)))(params, jax.tree.map(jnp.negative, grads))
    np.testing.assert_allclose(value, before, atol=1e-6)
    assert np.all(np.asarray(slope) > 0), slope
    trained, losses = run(optax.adam(1e-3), 40)
    assert losses[-1] < 0.1 < losses[0]
    after = critic.preference(trained, pairs)
    assert critic.accuracy(trained, pairs) == 1.0 and after.min() > 0.9, after


def test_verifiable_and_held_out_pairs():
    problems = [Problem("arithmetic", 1, "3+4=", "7", "3+4"), Problem("arithmetic", 1, "1+1=", "2", "1+1")]
    responses = ["7", "8", "8", None, "3", "5", "x", "1"]
    scores = [1.0, 0.0, 0.0, None, 0.0, 0.0, 0.0, 0.0]
    responses = [r or "" for r in responses]
    assert C.verifiable_pairs(problems, responses, scores, samples_per_prompt=4) == [("3+4=", "7", "8")]
    with_ref = C.verifiable_pairs(problems, responses, scores, samples_per_prompt=4, use_reference=True)
    assert with_ref == [("3+4=", "7", "8")] + [("1+1=", "2", w) for w in ("3", "5", "x", "1")]
    held_out = generate(arithmetic, 0, 8, difficulty=1, split="held_out")
    pairs = C.held_out_pairs(held_out, 12, seed=0, reward_fn=score)
    assert len(pairs) == 12 and len(set(pairs)) == 12
    assert len({q for q, _, _ in pairs[:8]}) == 8                  # round-robin over the problems
    by_prompt = {p.prompt: p for p in held_out}
    for q, good, bad in pairs:
        assert good == by_prompt[q].answer
        assert score([by_prompt[q]], [bad])[0].score == 0.0
    assert pairs == C.held_out_pairs(held_out, 12, seed=0, reward_fn=score)


SMALL = {"model.num_hidden_layers": 1, "prompts.per_step": 2, "rollout.samples_per_prompt": 4,
         "rollout.max_slots": 16, "rollout.budgets": {"arithmetic": 6}, "rollout.seq_len": 40,
         "eval.every": 2, "eval.num_prompts": 2, "eval.samples": 2, "eval.k": 1, "steps": 2,
         "critic.enabled": True, "critic.core_rubrics": SHORT.core, "critic.prescriptive_rubrics": SHORT.prescriptive,
         "critic.instruction": "A or B?", "critic.reward_weight": 0.5, "critic.batch_pairs": 4,
         "critic.eval_problems": 4, "critic.eval_pairs": 8, "critic.length_bucket": 64, "critic.forward_batch": 16}


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def critic_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rl_critic") / "run")
    train_rl(override(rl_tiny.get_config(), SMALL), workdir)
    return workdir


def test_rl_loop_with_the_critic_logs_its_metrics(critic_run):
    """2 iterations, separate critic, rubric reward on (weight 0.5): critic metrics every iteration, held-out
    accuracies at steps 0 and 2, and the critic's checkpoint next to the RL checkpoint."""
    workdir = critic_run
    lines = read_metrics(workdir)
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert {"critic_pairwise_accuracy", "critic_onpolicy_accuracy"} <= set(lines[0])
    for line in lines[1:]:
        assert {"rubric_reward", "critic_pairs", "critic_s"} <= set(line)
        assert 0.0 < line["rubric_reward"] < 1.0
        assert line["critic_pairs"] > 0                            # the reference answer against wrong samples
        assert line["critic_loss"] > 0 and line["critic_grad_norm"] > 0 and line["critic_skipped"] == 0
        # shaped = score - 0.5 truncated + 0.5 rubric
        assert line["shaped_reward"] == pytest.approx(
            line["reward"] - 0.5 * line["truncated_share"] + 0.5 * line["rubric_reward"], abs=1e-5)
    assert 0.0 <= lines[2]["critic_pairwise_accuracy"] <= 1.0
    assert sorted(os.listdir(os.path.join(workdir, "critic_checkpoints"))) == ["2"]


TIMING = {"time", "sync_s", "rollout_tokens_per_s", "train_tokens_per_s", "critic_s"}


@pytest.mark.slow
def test_rl_loop_with_the_critic_resumes_exactly_after_sigterm(critic_run, tmp_path):
    """SIGTERM during iteration 1's rollout: the run saves the RL and the critic checkpoints after iteration 1 and
    stops; rerun, it resumes and logs iteration 2 (critic loss, held-out accuracies included) exactly as the
    uninterrupted run did."""
    calls = []

    def reward_sending_sigterm(problems, responses):
        if not in_held_out(problems[0].key):      # a training rollout (not an eval, not the held-out pairs)
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return score(problems, responses)

    workdir = str(tmp_path / "run")
    stopped = train_rl(override(rl_tiny.get_config(), SMALL), workdir, reward_fn=reward_sending_sigterm)
    assert stopped["step"] == 1
    assert sorted(os.listdir(os.path.join(workdir, "critic_checkpoints"))) == ["1"]
    train_rl(override(rl_tiny.get_config(), SMALL), workdir)
    strip = lambda lines: [{k: v for k, v in line.items() if k not in TIMING} for line in lines]
    assert strip(read_metrics(workdir)) == strip(read_metrics(critic_run))


def test_policy_mode_updates_the_policy_parameters_with_the_critics_own_optimizer(tmp_path):
    """config.critic.mode "policy": the BT step changes the policy's parameters and advances the critic's own step
    and optimizer state; the policy's step counter and optimizer state are untouched."""
    from kimi_jax.rl.rollout import Rollout
    from kimi_jax.train import loop

    config = override(rl_tiny.get_config(), {**SMALL, "critic.mode": "policy", "critic.eval_pairs": 0})
    cfg, mesh = loop.model_config(config.model), loop.make_mesh(config.mesh)
    graphdef, state, _, _ = loop.init_state(config, cfg, mesh)
    critic = C.LoopCritic(config, cfg, mesh, load_tokenizer("byte"), graphdef, state, str(tmp_path), resume=False,
                          reward_fn=score)
    problems = generate(arithmetic, 0, 2, difficulty=1)
    texts = [problems[0].answer, "x", "y", "1", "0", "z", problems[1].answer, "5"]
    out = Rollout(problems=problems, prompts=[], responses=[], logprobs=[], texts=texts,
                  truncated=np.zeros((2, 4), bool), scores=[score([p], [t])[0].score for p, t in
                                                          zip([problems[0]] * 4 + [problems[1]] * 4, texts)],
                  samples_per_prompt=4)
    before = jax.tree.map(np.asarray, state.params)
    policy_opt = jax.tree.map(np.asarray, state.opt_state)
    new_state, metrics = critic.update(state, out, iteration=1)
    assert metrics["critic_pairs"] == 6 and metrics["critic_loss"] > 0       # 3 + 3 (correct x wrong) pairs
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before),
                                                                  jax.tree.leaves(new_state.params))]
    assert any(changed)
    assert int(critic.state.step) == 1 and critic.state.params is None and int(new_state.step) == 0
    for a, b in zip(jax.tree.leaves(policy_opt), jax.tree.leaves(new_state.opt_state)):
        np.testing.assert_array_equal(a, np.asarray(b))
    critic.close()


def test_critic_config_errors_name_the_field():
    for overrides, field in [({"critic.mode": "judge"}, "config.critic.mode"),
                             ({"critic.batch_pairs": 0}, "config.critic.batch_pairs"),
                             ({"critic.reward_weight": -1.0}, "config.critic.reward_weight")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            check_config(override(rl_tiny.get_config(), {"critic.enabled": True, **overrides}))
    check_config(override(rl_tiny.get_config(), {"critic.mode": "judge"}))      # disabled: not checked
