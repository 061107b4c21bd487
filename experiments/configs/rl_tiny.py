"""RL on verifiable rewards with the tiny preset (kimi_jax/rl/loop.py): integer arithmetic, K2's loss, MuonClip.

    python launch/rl.py --config=experiments/configs/rl_tiny.py --workdir=/tmp/kimi_rl \
        --config.init_workdir=/tmp/kimi_tiny_sft --config.steps=200

`steps` counts RL iterations (sync, rollout, `rl.updates_per_rollout` gradient steps). Every value K2 does not
publish (tau, K, learning rate, budgets, penalty, PTX weight, the temperature schedule) is a field here; the
defaults are our choices for a small CPU run.
"""

import ml_collections

from experiments.configs.base import base_config
from kimi_jax.rl import critic as critic_rubrics


def get_config():
    c = base_config("tiny")
    c.steps = 100
    c.log_every = 1
    c.checkpoint_every = 20
    c.init_workdir = ""             # a training workdir whose newest parameters the policy starts from ("": random)
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.rl = ml_collections.ConfigDict({
        "loss": "k2",                 # "k2" (policy_loss) or "grpo" (grpo_loss, for A/B runs)
        "tau": 0.01,                  # K2's tau (a third-party reproduction's value)
        "clip_eps": 0.2,              # GRPO only
        "updates_per_rollout": 1,     # gradient steps per rollout batch
        "microbatches": 1,            # forward/backward in this many groups of whole prompts (same step, less memory)
        "shuffle_rewards": False,     # control runs: rewards permuted across the iteration's samples
    })
    c.prompts = ml_collections.ConfigDict({
        "family": "arithmetic",       # kimi_jax.rl.tasks.FAMILIES
        "difficulty": 1,
        "pool_size": 128,             # training problems to draw from (difficulty 1 has ~180)
        "per_step": 8,                # prompts per iteration (P)
        "sampling": "uniform",        # "uniform" or "prioritised" (k1.5: weight 1 - success rate)
        "system_prompt": "",          # None: the chat template's default system turn
    })
    c.rollout = ml_collections.ConfigDict({
        "samples_per_prompt": 8,      # K
        "temperature": 1.0,           # start of the decay
        "final_temperature": 0.8,
        "temperature_decay_steps": 100,   # iterations of the linear decay (0: constant)
        "top_p": 1.0,
        "budgets": {"arithmetic": 16, "countdown": 48, "strings": 32, "python_functions": 192},
        "budget_penalty": 0.5,        # subtracted from a truncated response's reward
        "length_reward_weight": 0.0,  # k1.5's length reward, added with this weight (0: off)
        "seq_len": 96,                # prompt + response positions of the RL batch
        "param_dtype": "float32",     # the engine's parameters (bf16 would make old_logp differ from the trainer's)
        "offload_trainer": True,      # trainer state in host memory during rollouts (K2's colocated setup)
        "bucket_bytes": 64 << 20,     # weight-sync bucket
        "max_slots": 64, "page_size": 16, "num_pages": 512, "prefill_chunk": 64, "prefill_batch": 8,
        "decode_steps": 8,
        "mesh": ml_collections.ConfigDict({"data": -1}),   # the engine's mesh (MeshConfig fields)
    })
    c.ptx = ml_collections.ConfigDict({
        "weight": 0.0,                # PTX loss weight (0: off)
        "batch_size": 8,              # reference answers of training problems, chat-formatted
        "seq_len": 64,
    })
    c.eval = ml_collections.ConfigDict({
        "every": 10,                  # held-out pass@1 / pass@k every this many iterations (0: never)
        "num_prompts": 16,            # held-out problems (arithmetic difficulty 1 has 18)
        "samples": 8,                 # n samples per held-out prompt
        "k": 8,                       # pass@k (and pass@1)
        "temperature": 1.0,
    })
    # Self-critique rubric reward with a closed loop (kimi_jax/rl/critic.py; K2 3.2.2, appendix F). Not published:
    # how wins become a reward, the critic's loss, its learning rate: our choices below.
    c.critic = ml_collections.ConfigDict({
        "enabled": False,
        "mode": "separate",           # "policy" (the policy is the critic) or "separate" (its own state)
        "init_workdir": "",           # separate: a training workdir whose newest parameters the critic starts
                                      # from ("": the policy's initial parameters)
        "core_rubrics": critic_rubrics.CORE_RUBRICS,
        "prescriptive_rubrics": critic_rubrics.PRESCRIPTIVE_RUBRICS,
        "instruction": critic_rubrics.INSTRUCTION,   # the critic prompt's first paragraph
        "system_prompt": "",          # None: the chat template's default system turn
        "reward_weight": 0.0,         # shaped reward += weight x rubric reward (mean win probability among the
                                      # prompt's K samples); 0: only train and evaluate the critic
        "updates_per_iteration": 1,   # BT steps after each policy update, on that iteration's verifiable pairs
        "batch_pairs": 16,            # (correct, incorrect) pairs per BT step (x 2 orders = rows)
        "use_reference": True,        # a prompt without a correct sample pairs its reference answer with the wrong
        "loss": "paired",             # BT on the order-debiased margin ("paired") or per order ("row")
        "learning_rate": 1e-3,        # the critic's optimizer: config.optimizer with this learning rate
        "eval_problems": 16,          # held-out problems of the critic's fixed held-out pairs
        "eval_pairs": 64,             # held-out pairs (critic_pairwise_accuracy at eval steps; 0: none)
        "seq_len": 1024,              # longest critic prompt (tokens)
        "length_bucket": 64,          # critic prompts are padded to a multiple of this
        "forward_batch": 64,          # rows per critic forward
    })
    return c
