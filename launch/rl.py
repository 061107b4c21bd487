"""RL on verifiable rewards (Kimi K2 section 3.2): colocated rollouts with the engine, K2's policy loss, MuonClip.

    python launch/rl.py --config=experiments/configs/rl_tiny.py --workdir=/tmp/kimi_rl \
        --config.init_workdir=/tmp/kimi_tiny_sft --config.prompts.family=arithmetic --config.steps=200

The workdir follows the training conventions: config.json, checkpoints/ (resumed automatically, exactly),
metrics.jsonl, tensorboard/; SIGTERM saves and exits. One process (the trainer and the engine share its devices).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/rl_tiny.py", "RL config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/rl_tiny", "Checkpoints, metrics.jsonl and TensorBoard events.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)    # orbax logs every save at INFO
    from kimi_jax.rl.loop import train_rl
    print(json.dumps(train_rl(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
    app.run(main)
