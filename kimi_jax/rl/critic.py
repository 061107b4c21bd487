"""Self-critique rubric reward (K2 section 3.2.2, appendix F; POSTTRAINING.md section 2): a critic model compares
two responses against rubrics, its preferences become rewards, and verifiable prompts keep training it.

The critic is a kimi-jax model (the policy itself, or a separate checkpoint). Its prompt is one user turn in the
Kimi chat format (`critic_messages`): the rubrics (core + prescriptive, plain text from the config), the task's
prompt and two responses labelled A and B, asking for one letter; then the generation prompt
`<|im_assistant|>assistant<|im_middle|>`. The critic's verdict is read from its next-token logits at that last
position, restricted to the two choice tokens "A" and "B" (`choice_token_ids`: single tokens, else an error):

    p_A(x, y) = softmax(logit_A, logit_B)[A]    for the prompt with x as A and y as B
    P(a beats b) = 1/2 [ p_A(a, b) + (1 - p_A(b, a)) ]     both orders, so the label's position bias cancels

computed as 1/2 + 1/2 (p_A(a, b) - p_A(b, a)) rounded to a 2^-40 grid, so that P(a beats b) + P(b beats a) == 1
exactly and P(a beats a) == 1/2. A response's rubric reward is its mean win probability against the other K - 1
samples of its prompt (`Critic.rubric_rewards`, [P, K]); all K (K - 1) ordered pairs of a prompt are one batch of
forwards. How wins become a reward and the critic's loss are not published (POSTTRAINING.md 2): win rate and
Bradley-Terry are our choices.

Closed loop (`verifiable_pairs`, `make_critic_step`): on verifiable prompts, each (correct, incorrect) pair of a
prompt's samples is a labelled comparison; both orders go into a batch and the critic minimises a Bradley-Terry
loss over the two choice logits (d = logit_A - logit_B), with the training step's update
(kimi_jax.train.step.apply_update: optimizer, QK-Clip, router bias):

    "row"    (`bt_loss`):        mean over the 2 rows of each pair of -log sigmoid(+-d) (the label's side)
    "paired" (`paired_bt_loss`): mean over pairs of -log sigmoid((d(a, b) - d(b, a)) / 2), a the better response

"paired" is the default: a critic's constant preference for one letter cancels in it, as it does in P(a beats
b). Measured on a random-init 2-layer tiny critic, 4 pairs, Adam 1e-3 (tests/rl/test_critic.py's setting):
"paired" took the pairs' preferences to > 0.99 in 35 steps; "row" spent its steps on the letter bias and was
still at 0.5000-0.5003 after 40.

Prompts are right-padded into buckets (rows: a power of two, at least the mesh's batch split, at most
`max_rows`; positions: a multiple of `length_bucket`, at most `seq_len`), so a run compiles a few shapes only.
Special-token names inside responses (a model's sample may decode to "<|im_end|>") are neutralised ("<|" ->
"< |") before rendering, so a response cannot end the critic's user turn.

`LoopCritic` is the RL loop's side of it (kimi_jax/rl/loop.py, config.critic): the critic's state ("separate":
its own TrainState, from config.critic.init_workdir or the policy's initial parameters; "policy": the policy's
parameters, updated by the critic step with the critic's own optimizer state), the BT updates after each policy
step, the rubric reward, the held-out accuracies and the critic's checkpoint (<workdir>/critic_checkpoints, saved
at the iterations of the RL checkpoint, restored at the same iteration: an exact resume).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from kimi_jax import chat, sharding
from kimi_jax.rl.tasks import Problem
from kimi_jax.train.step import TrainState, apply_update, param_constraint

CHOICES = ("A", "B")
MODES = ("policy", "separate")
GRID = 2.0 ** -40           # P(a beats b) is rounded to this grid so that both orders sum to exactly 1

# Paraphrases of K2's published rubrics (arXiv 2507.20534 appendix F); config.critic.*_rubrics default to these.
CORE_RUBRICS = (
    "- Clarity and relevance: the response is succinct and fully addresses the user's intent, without "
    "unnecessary detail.\n"
    "- Conversational fluency and engagement: the response is coherent and natural and engages with the topic "
    "where it helps.\n"
    "- Objective and grounded interaction: the response stays objective and on the substance of the request: "
    "correct, factual, no metacommentary, no flattery.")
PRESCRIPTIVE_RUBRICS = (
    "- No initial praise: the response must not begin by complimenting the user or the question (e.g. "
    "\"Good question!\").\n"
    "- No explicit justification: the response must not explain why it is good or how it fulfilled the request.")
INSTRUCTION = ("Compare the two responses to the prompt below against the rubrics. Answer with one letter: A if "
               "response A is better, B if response B is better.")


@dataclasses.dataclass(frozen=True)
class Rubrics:
    """The texts of the critic prompt: core and prescriptive rubrics, and the instruction before them."""
    core: str = CORE_RUBRICS
    prescriptive: str = PRESCRIPTIVE_RUBRICS
    instruction: str = INSTRUCTION


def neutralise(text: str) -> str:
    """Text with special-token names broken ("<|" -> "< |"), so rendering cannot turn it into special tokens."""
    return text.replace("<|", "< |")


def critic_messages(problem_prompt: str, response_a: str, response_b: str, rubrics: Rubrics = Rubrics(),
                    system_prompt: str | None = "") -> list[dict]:
    """The critic's dialogue: [system turn] + one user turn with the rubrics, the prompt and responses A and B.
    system_prompt None: the chat template's default system turn."""
    content = (f"{rubrics.instruction}\n\nCore rubrics:\n{rubrics.core}\n\n"
               f"Prescriptive rubrics:\n{rubrics.prescriptive}\n\nPrompt:\n{neutralise(problem_prompt)}\n\n"
               f"Response A:\n{neutralise(response_a)}\n\nResponse B:\n{neutralise(response_b)}")
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return messages + [{"role": "user", "content": content}]


def critic_prompt(problem_prompt: str, response_a: str, response_b: str, rubrics: Rubrics = Rubrics(),
                  system_prompt: str | None = "") -> str:
    """The rendered critic prompt (chat.render, ending with the generation prompt)."""
    return chat.render(critic_messages(problem_prompt, response_a, response_b, rubrics, system_prompt),
                       add_generation_prompt=True)


def critic_prompt_ids(tokenizer, problem_prompt: str, response_a: str, response_b: str,
                      rubrics: Rubrics = Rubrics(), system_prompt: str | None = "") -> list[int]:
    return chat.encode(tokenizer, critic_messages(problem_prompt, response_a, response_b, rubrics, system_prompt),
                       add_generation_prompt=True)[0]


def choice_token_ids(tokenizer) -> tuple[int, int]:
    """The ids of "A" and "B" (ValueError unless each is a single token)."""
    ids = []
    for letter in CHOICES:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"the critic's choice {letter!r} is {len(encoded)} tokens {encoded} with this tokenizer; "
                             f"it must be one")
        ids.append(encoded[0])
    return ids[0], ids[1]


def preference_from_choices(p_first: np.ndarray, p_second: np.ndarray) -> np.ndarray:
    """P(a beats b) from p_first = p_A of the prompt (a, b) and p_second = p_A of the prompt (b, a):
    1/2 + 1/2 (p_first - p_second) on the 2^-40 grid (module docstring)."""
    half = 0.5 * (np.asarray(p_first, np.float64) - np.asarray(p_second, np.float64))
    return 0.5 + np.round(half / GRID) * GRID


def bt_loss(choice_logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Bradley-Terry loss over the two choice logits: choice_logits [n, 2] (A, B), labels int [n] (0: A is the
    better response, 1: B), weights [n] (0 for padding rows; default 1) -> the weighted mean of
    -log softmax(choice_logits)[label]."""
    logits = choice_logits.astype(jnp.float32)
    weights = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def paired_bt_loss(choice_logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """The Bradley-Terry loss on the order-debiased margin (the default, config.critic.loss "paired"): rows 2i and
    2i + 1 are the two orders of pair i (bt_batch's layout). With s_r = +-(logit_A - logit_B) toward row r's
    label, pair i's margin is m_i = (s_2i + s_2i+1) / 2 (for labels (0, 1): (d(a, b) - d(b, a)) / 2), and the loss
    the weighted mean of -log sigmoid(m_i) (weights: row 2i's). A constant preference for one letter cancels in
    m_i, so the gradient only sees how the verdict depends on the responses; for logits without such a bias
    (d(b, a) = -d(a, b)) it equals bt_loss."""
    logits = choice_logits.astype(jnp.float32)
    signed = (logits[:, 0] - logits[:, 1]) * (1.0 - 2.0 * labels.astype(jnp.float32))
    margin = 0.5 * signed.reshape(-1, 2).sum(1)
    weights = jnp.ones(margin.shape, jnp.float32) if weights is None else weights.reshape(-1, 2)[:, 0]
    return jnp.sum(jax.nn.softplus(-margin) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


LOSSES = {"paired": paired_bt_loss, "row": bt_loss}


def choice_logits_fn(graphdef, choice_ids: tuple[int, int]):
    """-> f(params, batch) -> (choice logits fp32 [n, 2] at each row's last real position, aux of the forward).
    batch: input_ids, positions, segment_ids int32 [n, T], last int32 [n]."""
    ids = jnp.asarray(choice_ids, jnp.int32)

    def f(params, batch):
        model = nnx.merge(graphdef, params)
        x, aux = model.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
        last = jnp.take_along_axis(x, batch["last"][:, None, None], axis=1)[:, 0]     # [n, hidden]
        return jnp.take(model.logits(last), ids, axis=-1), aux

    return f


def make_critic_loss(graphdef, choice_ids: tuple[int, int], loss: str = "paired"):
    """-> loss_fn(params, batch) -> (BT loss, (metrics, max_logits, expert counts)); batch: choice_logits_fn's
    arrays + labels int32 [n], weights fp32 [n] (bt_batch). loss: "paired" (paired_bt_loss) or "row" (bt_loss).
    metrics: critic_loss, critic_accuracy (weighted share of pairs, rows 2i and 2i + 1, whose order-debiased
    margin favours the better response, ties half: before the update)."""
    if loss not in LOSSES:
        raise ValueError(f"config.critic.loss must be one of {sorted(LOSSES)}, got {loss!r}")
    forward, objective = choice_logits_fn(graphdef, choice_ids), LOSSES[loss]

    def loss_fn(params, batch):
        logits, aux = forward(params, batch)
        loss = objective(logits, batch["labels"], batch["weights"])
        signed = (logits[:, 0] - logits[:, 1]) * (1.0 - 2.0 * batch["labels"].astype(jnp.float32))
        margin = signed.reshape(-1, 2).sum(1)
        right = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
        weights = batch["weights"].reshape(-1, 2)[:, 0]
        accuracy = jnp.sum(right * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return loss, ({"critic_loss": loss, "critic_accuracy": accuracy}, aux["max_logits"],
                      aux.get("expert_counts"))

    return loss_fn


def make_critic_step(graphdef, cfg, tx: optax.GradientTransformation, lr_schedule, choice_ids: tuple[int, int], *,
                     loss: str = "paired", qk_clip_tau: float | None = None, router_bias_update_rate: float = 1e-3):
    """-> step(state: TrainState, batch) -> (state, metrics): one gradient step of the BT loss (make_critic_loss)
    with the training step's update (apply_update; a non-finite step is skipped). metrics: critic_loss,
    critic_accuracy, critic_grad_norm, critic_lr, critic_skipped, critic_nonfinite_streak."""
    grad_fn = jax.value_and_grad(make_critic_loss(graphdef, choice_ids, loss), has_aux=True)

    def step(state: TrainState, batch: dict):
        on_shards = param_constraint(nnx.merge(graphdef, state.params), cfg, state.params)
        (loss, (metrics, max_logits, counts)), grads = grad_fn(state.params, batch)
        grads = on_shards(grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(max_logits))
        new_state, _ = apply_update(tx, cfg, state, grads, max_logits, counts, finite, qk_clip_tau=qk_clip_tau,
                                    router_bias_update_rate=router_bias_update_rate)
        metrics.update(critic_grad_norm=grad_norm, critic_lr=lr_schedule(state.step),
                       critic_skipped=(~finite).astype(jnp.int32), critic_nonfinite_streak=new_state.nonfinite_streak)
        return new_state, metrics

    return step


Pair = tuple[str, str, str]        # (problem prompt, better response, worse response)


def verifiable_pairs(problems: Sequence[Problem], responses: Sequence[str], scores: Sequence[float | None], *,
                     samples_per_prompt: int, use_reference: bool = False) -> list[Pair]:
    """(prompt, correct, incorrect) for every correct x incorrect pair of samples of each prompt: P problems,
    P * K responses and scores (row p * K + k; score >= 1: correct, None: unscored, left out). Identical texts
    are paired once. use_reference: a prompt with wrong samples and no correct one pairs its reference answer
    (Problem.answer) with them."""
    k = samples_per_prompt
    if len(responses) != len(problems) * k or len(scores) != len(responses):
        raise ValueError(f"{len(problems)} problems x K={k} need as many responses and scores, got "
                         f"{len(responses)} and {len(scores)}")
    pairs = []
    for p, problem in enumerate(problems):
        rows = range(p * k, (p + 1) * k)
        good = list(dict.fromkeys(responses[i] for i in rows if scores[i] is not None and scores[i] >= 1.0))
        bad = list(dict.fromkeys(responses[i] for i in rows if scores[i] is not None and scores[i] < 1.0))
        if not good and bad and use_reference:
            good = [problem.answer]
        pairs += [(problem.prompt, g, b) for g in good for b in bad if g != b]
    return pairs


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Critic:
    """Rendering, bucketing and the jitted forward of a critic model (graphdef); parameters are passed per call.

    rubrics/system_prompt: the critic prompt's (critic_messages); seq_len: the longest prompt (longer: ValueError
    naming config.critic.seq_len); length_bucket: positions are padded to a multiple of it; max_rows: rows per
    forward; row_multiple: the mesh's batch split (rows are a multiple of it); fixed_rows: every forward has
    max_rows rows (one compile per length bucket; the RL loop's choice); put: places a batch of host arrays
    (default: jnp.asarray)."""

    def __init__(self, graphdef, tokenizer, *, rubrics: Rubrics = Rubrics(), system_prompt: str | None = "",
                 seq_len: int = 1024, length_bucket: int = 64, max_rows: int = 64, row_multiple: int = 1,
                 fixed_rows: bool = False, put: Callable[[dict], dict] | None = None):
        self.graphdef, self.tokenizer, self.rubrics, self.system_prompt = graphdef, tokenizer, rubrics, system_prompt
        self.seq_len, self.length_bucket, self.row_multiple = seq_len, length_bucket, row_multiple
        self.max_rows = max(row_multiple, max_rows // row_multiple * row_multiple)
        self.fixed_rows = fixed_rows
        self.put = put or (lambda tree: jax.tree.map(jnp.asarray, tree))
        self.choice_ids = choice_token_ids(tokenizer)
        forward = choice_logits_fn(graphdef, self.choice_ids)
        self._logits = jax.jit(lambda params, batch: forward(params, batch)[0])
        self._ids: dict[tuple[str, str, str], list[int]] = {}

    def prompt_ids(self, problem_prompt: str, first: str, second: str) -> list[int]:
        key = (problem_prompt, first, second)
        if key not in self._ids:
            if len(self._ids) > 100_000:
                self._ids.clear()
            self._ids[key] = critic_prompt_ids(self.tokenizer, problem_prompt, first, second, self.rubrics,
                                               self.system_prompt)
        return self._ids[key]

    def rows(self, n: int) -> int:
        """The row bucket of a batch of n prompts (n <= max_rows)."""
        if self.fixed_rows:
            return self.max_rows
        rows = max(_next_pow2(n), self.row_multiple)
        return min(-(-rows // self.row_multiple) * self.row_multiple, self.max_rows)

    def arrays(self, prompts: Sequence[list[int]], rows: int | None = None) -> dict[str, np.ndarray]:
        """Right-padded arrays of `prompts` (+ padding rows up to `rows`: a one-token sequence each)."""
        rows = rows or self.rows(len(prompts))
        longest = max(len(p) for p in prompts)
        if longest > self.seq_len:
            raise ValueError(f"a critic prompt of {longest} tokens exceeds config.critic.seq_len ({self.seq_len})")
        length = min(-(-longest // self.length_bucket) * self.length_bucket, max(self.seq_len, longest))
        out = {"input_ids": np.zeros((rows, length), np.int32),
               "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
               "segment_ids": np.zeros((rows, length), np.int32), "last": np.zeros(rows, np.int32)}
        out["segment_ids"][:, 0] = 1
        for row, ids in enumerate(prompts):
            out["input_ids"][row, :len(ids)] = ids
            out["segment_ids"][row, :len(ids)] = 1
            out["last"][row] = len(ids) - 1
        return out

    def choice_logits(self, params, prompts: Sequence[list[int]]) -> np.ndarray:
        """fp32 [len(prompts), 2]: the (A, B) logits after each prompt, max_rows prompts per forward."""
        out = []
        for start in range(0, len(prompts), self.max_rows):
            chunk = prompts[start:start + self.max_rows]
            logits = self._logits(params, self.put(self.arrays(chunk)))
            out.append(np.asarray(jax.device_get(logits))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def p_first(self, params, triples: Sequence[tuple[str, str, str]]) -> np.ndarray:
        """p_A (float64) of each (prompt, first, second) rendered in that order; each distinct triple once."""
        unique = list(dict.fromkeys(triples))
        logits = self.choice_logits(params, [self.prompt_ids(*t) for t in unique]).astype(np.float64)
        p = 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))           # softmax over (A, B), A's share
        index = {t: i for i, t in enumerate(unique)}
        return np.array([p[index[t]] for t in triples], np.float64)

    def preference(self, params, pairs: Sequence[Pair]) -> np.ndarray:
        """P(a beats b) (float64 [n]) of each (prompt, a, b): both orders, one batch of forwards."""
        if not pairs:
            return np.zeros(0)
        swapped = [(q, b, a) for q, a, b in pairs]
        p = self.p_first(params, list(pairs) + swapped)
        return preference_from_choices(p[:len(pairs)], p[len(pairs):])

    def preference_matrix(self, params, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> np.ndarray:
        """[P, K, K]: entry (p, i, j) = P(response i beats response j) for prompt p (diagonal 1/2); all
        K (K - 1) ordered pairs of every prompt in one batch of forwards."""
        k = len(responses[0])
        if any(len(r) != k for r in responses) or len(responses) != len(prompts):
            raise ValueError("responses must be [P][K] with one list of K per prompt")
        triples = [(q, rs[i], rs[j]) for q, rs in zip(prompts, responses) for i in range(k) for j in range(k)
                   if i != j]
        p = self.p_first(params, triples).reshape(len(prompts), k, k - 1) if k > 1 else None
        out = np.full((len(prompts), k, k), 0.5)
        if p is None:
            return out
        first = np.zeros((len(prompts), k, k))
        off = ~np.eye(k, dtype=bool)
        first[:, off] = p.reshape(len(prompts), -1)
        out[:, off] = preference_from_choices(first, np.swapaxes(first, 1, 2))[:, off]
        return out

    def rubric_rewards(self, params, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> np.ndarray:
        """[P, K]: each response's mean P(it beats the other sample) over the other K - 1 samples of its prompt
        (0.5 when K == 1)."""
        matrix = self.preference_matrix(params, prompts, responses)
        k = matrix.shape[1]
        if k == 1:
            return np.full(matrix.shape[:2], 0.5)
        return (matrix.sum(2) - 0.5) / (k - 1)

    def accuracy(self, params, pairs: Sequence[Pair]) -> float:
        """Share of (prompt, better, worse) pairs with P(better beats worse) > 1/2 (ties count 1/2)."""
        p = self.preference(params, pairs)
        return float(np.mean(np.where(p > 0.5, 1.0, np.where(p == 0.5, 0.5, 0.0)))) if len(p) else float("nan")

    def bt_batch(self, pairs: Sequence[Pair], rows: int | None = None) -> dict[str, np.ndarray]:
        """The BT training batch of (prompt, better, worse) pairs: both orders (better as A: label 0; as B:
        label 1), padded to `rows` rows (default 2 len(pairs), bucketed) with weight-0 rows."""
        prompts, labels = [], []
        for q, better, worse in pairs:
            prompts += [self.prompt_ids(q, better, worse), self.prompt_ids(q, worse, better)]
            labels += [0, 1]
        rows = rows or self.rows(len(prompts))
        if len(prompts) > rows:
            raise ValueError(f"{len(pairs)} pairs need {len(prompts)} rows, more than {rows}")
        batch = self.arrays(prompts, rows)
        batch["labels"] = np.zeros(rows, np.int32)
        batch["labels"][:len(labels)] = labels
        batch["weights"] = np.zeros(rows, np.float32)
        batch["weights"][:len(labels)] = 1.0
        return batch


def preference(model, tokenizer, pairs: Sequence[Pair], **critic_kwargs) -> np.ndarray:
    """P(a beats b) of each (prompt, a, b) under `model` (an nnx Transformer); critic_kwargs: Critic's."""
    graphdef, state = nnx.split(model)
    return Critic(graphdef, tokenizer, **critic_kwargs).preference(nnx.to_pure_dict(state), pairs)


def rubrics_of(config) -> Rubrics:
    return Rubrics(core=config.critic.core_rubrics, prescriptive=config.critic.prescriptive_rubrics,
                   instruction=config.critic.instruction)


def check_config(config) -> None:
    """ValueErrors naming the config.critic field (called by the RL loop's check_config when enabled)."""
    c = config.critic
    if c.mode not in MODES:
        raise ValueError(f"config.critic.mode must be one of {MODES}, got {c.mode!r}")
    if c.loss not in LOSSES:
        raise ValueError(f"config.critic.loss must be one of {sorted(LOSSES)}, got {c.loss!r}")
    for name in ("updates_per_iteration", "batch_pairs", "seq_len", "length_bucket", "forward_batch"):
        value = c[name]
        minimum = 0 if name == "updates_per_iteration" else 1
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"config.critic.{name} must be an integer >= {minimum}, got {value!r}")
    if c.reward_weight < 0:
        raise ValueError(f"config.critic.reward_weight must be >= 0, got {c.reward_weight}")
    if c.learning_rate <= 0:
        raise ValueError(f"config.critic.learning_rate must be > 0, got {c.learning_rate}")
    if c.mode == "policy" and c.init_workdir:
        raise ValueError("config.critic.init_workdir is for mode 'separate' (mode 'policy' is the policy itself)")


def held_out_pairs(problems: Sequence[Problem], count: int, seed: int, reward_fn) -> list[Pair]:
    """`count` fixed (prompt, reference answer, wrong answer) pairs of held-out problems: the wrong answer is
    another problem's reference answer that reward_fn scores below 1 for this problem (a plausible answer of the
    right form that is verifiably wrong). Deterministic in (problems, seed)."""
    rng = np.random.default_rng([seed, 4])
    per_problem = -(-count // max(len(problems), 1)) + 2      # candidates verified per problem (bounds sandbox runs)
    candidates = []
    for i, problem in enumerate(problems):
        others = list(dict.fromkeys(o.answer for j, o in enumerate(problems) if j != i and o.answer != problem.answer))
        picked = rng.permutation(len(others))[:per_problem]
        candidates += [(problem, others[j]) for j in sorted(picked)]
    if not candidates:
        return []
    scores = [r.score for r in reward_fn([p for p, _ in candidates], [o for _, o in candidates])]
    wrong = [(p.prompt, p.answer, o) for (p, o), s in zip(candidates, scores) if s is not None and s < 1.0]
    by_problem: dict[str, list[Pair]] = {}
    for pair in wrong:
        by_problem.setdefault(pair[0], []).append(pair)
    # round-robin over the problems, so every problem contributes before any contributes twice
    ordered, depth = [], 0
    while len(ordered) < count and any(depth < len(g) for g in by_problem.values()):
        ordered += [g[depth] for g in by_problem.values() if depth < len(g)]
        depth += 1
    return ordered[:count]


class LoopCritic:
    """The critic of an RL run (kimi_jax/rl/loop.py; config.critic, module docstring)."""

    def __init__(self, config, cfg, mesh, tokenizer, graphdef, policy_state: TrainState, workdir: str, *,
                 resume: bool, reward_fn):
        from kimi_jax.checkpoint.orbax_io import TrainCheckpointer
        from kimi_jax.train import loop
        from kimi_jax.train.checkpointing import load_run_config, restore_model

        c = self.c = config.critic
        self.mode, self.seed = c.mode, config.seed
        shardings = {ndim: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq")[:ndim], mesh))
                     for ndim in (1, 2)}
        put = self.put = lambda tree: jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(shardings[x.ndim], x), tree)
        train_config = ml_collections.ConfigDict(config.to_dict())
        train_config.steps = max(config.steps * c.updates_per_iteration, 1)
        train_config.optimizer.learning_rate = c.learning_rate
        if c.mode == "separate" and c.init_workdir:
            cfg = loop.model_config(load_run_config(c.init_workdir).model)
        self.cfg = cfg
        critic_graphdef, full, self.tx, self.lr = loop.abstract_train_state(train_config, cfg, mesh)
        abstract = full
        if c.mode == "policy":
            critic_graphdef = graphdef
            abstract = full._replace(params=None)
        self.graphdef = critic_graphdef

        def fresh(params):        # one jit: every leaf its own buffer (the step donates the state)
            zero = jnp.zeros((), jnp.int32)
            own = None if c.mode == "policy" else jax.tree.map(jnp.copy, params)
            return TrainState(zero, own, self.tx.init(params), zero, zero)

        if resume:
            self.state = abstract
        else:
            params = policy_state.params
            if c.mode == "separate" and c.init_workdir:
                params = nnx.to_pure_dict(nnx.state(restore_model(c.init_workdir, mesh)))
                params = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), params, abstract.params)
            self.state = jax.jit(fresh, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))(params)
        self.critic = Critic(critic_graphdef, tokenizer, rubrics=rubrics_of(config), system_prompt=c.system_prompt,
                             seq_len=c.seq_len, length_bucket=c.length_bucket, max_rows=c.forward_batch,
                             row_multiple=sharding.batch_divisor(mesh), fixed_rows=True, put=put)
        divisor = sharding.batch_divisor(mesh)
        self.batch_rows = -(-2 * c.batch_pairs // divisor) * divisor
        qk_clip_tau = config.optimizer.qk_clip_tau if config.optimizer.name == "muonclip" else None
        self.step_fn = jax.jit(make_critic_step(critic_graphdef, cfg, self.tx, self.lr, self.critic.choice_ids,
                                                loss=c.loss, qk_clip_tau=qk_clip_tau,
                                                router_bias_update_rate=config.train.router_bias_update_rate),
                               donate_argnums=0)
        self.ckpt = TrainCheckpointer(os.path.join(workdir, "critic_checkpoints"), keep=config.keep_checkpoints,
                                      save_every=config.checkpoint_every, async_save=config.async_checkpoint)
        self.eval_pairs: list[Pair] = []
        if c.eval_pairs:
            from kimi_jax.rl import tasks
            family = tasks.FAMILIES[config.prompts.family]
            try:
                problems = tasks.generate(family, config.seed, c.eval_problems, difficulty=config.prompts.difficulty,
                                          split="held_out")
            except ValueError as e:
                raise ValueError(f"config.critic.eval_problems ({c.eval_problems}): {e}") from e
            self.eval_pairs = held_out_pairs(problems, c.eval_pairs, config.seed, reward_fn)

    def params(self, policy_state: TrainState):
        return policy_state.params if self.mode == "policy" else self.state.params

    def _stored(self):
        return self.state._asdict() if self.mode == "separate" else {
            k: v for k, v in self.state._asdict().items() if k != "params"}

    def save(self, iteration: int) -> None:
        self.ckpt.save(iteration, self._stored(), {"iteration": iteration}, force=True)

    def restore(self, iteration: int) -> None:
        if iteration not in self.ckpt.all_steps():
            raise FileNotFoundError(f"the RL checkpoint of iteration {iteration} has no critic checkpoint in "
                                    f"{self.ckpt.directory} (saved {self.ckpt.all_steps()})")
        stored, _ = self.ckpt.restore(self._stored(), step=iteration)
        self.state = TrainState(**{**stored, "params": stored.get("params")})

    def close(self) -> None:
        self.ckpt.close()

    def wait(self) -> None:
        self.ckpt.wait()

    def rubric_rewards(self, policy_state, rollout) -> np.ndarray:
        k = rollout.samples_per_prompt
        texts = [rollout.texts[i:i + k] for i in range(0, len(rollout.texts), k)]
        return self.critic.rubric_rewards(self.params(policy_state), [p.prompt for p in rollout.problems],
                                          texts).astype(np.float32)

    def update(self, policy_state: TrainState, rollout, iteration: int) -> tuple[TrainState, dict]:
        """config.critic.updates_per_iteration BT steps on the (correct, incorrect) pairs of `rollout` (each step
        a fresh draw of batch_pairs pairs, seeded by (seed, iteration)) -> (policy state, metrics)."""
        pairs = verifiable_pairs(rollout.problems, rollout.texts, rollout.scores,
                                 samples_per_prompt=rollout.samples_per_prompt, use_reference=self.c.use_reference)
        metrics: dict[str, Any] = {"critic_pairs": len(pairs)}
        if not pairs or not self.c.updates_per_iteration:
            return policy_state, metrics
        rng = np.random.default_rng([self.seed, 3, iteration])
        for _ in range(self.c.updates_per_iteration):
            chosen = rng.choice(len(pairs), size=min(self.c.batch_pairs, len(pairs)), replace=False)
            batch = self.put(self.critic.bt_batch([pairs[i] for i in chosen], self.batch_rows))
            if self.mode == "policy":
                state = self.state._replace(params=policy_state.params)
                state, step_metrics = self.step_fn(state, batch)
                policy_state = policy_state._replace(params=state.params)
                self.state = state._replace(params=None)
            else:
                self.state, step_metrics = self.step_fn(self.state, batch)
        step_metrics = {k: np.asarray(v).item() for k, v in jax.device_get(step_metrics).items()}
        metrics.update({k: v for k, v in step_metrics.items() if k != "critic_nonfinite_streak"})
        return policy_state, metrics

    def evaluate(self, policy_state: TrainState, eval_rollout=None) -> dict[str, float]:
        """critic_pairwise_accuracy on the fixed held-out pairs (held_out_pairs) and, given the held-out eval
        rollout, critic_onpolicy_accuracy: (a verified-correct sample, else the reference answer, vs each wrong
        sample) pairs of the held-out problems, at most config.critic.eval_pairs of them."""
        params, out = self.params(policy_state), {}
        if self.eval_pairs:
            out["critic_pairwise_accuracy"] = self.critic.accuracy(params, self.eval_pairs)
        if eval_rollout is not None and self.c.eval_pairs:
            pairs = onpolicy_pairs(eval_rollout)[:self.c.eval_pairs]
            if pairs:
                out["critic_onpolicy_accuracy"] = self.critic.accuracy(params, pairs)
        return out


def onpolicy_pairs(rollout) -> list[Pair]:
    """For each prompt of a rollout, (prompt, its first verified-correct sample or else its reference answer,
    wrong sample) for each distinct wrong sample."""
    k, pairs = rollout.samples_per_prompt, []
    for p, problem in enumerate(rollout.problems):
        rows = range(p * k, (p + 1) * k)
        good = [rollout.texts[i] for i in rows if rollout.scores[i] is not None and rollout.scores[i] >= 1.0]
        better = good[0] if good else problem.answer
        bad = dict.fromkeys(rollout.texts[i] for i in rows
                            if rollout.scores[i] is not None and rollout.scores[i] < 1.0)
        pairs += [(problem.prompt, better, b) for b in bad if b != better]
    return pairs
