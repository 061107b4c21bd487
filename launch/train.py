"""Train a K2-architecture model.

    python launch/train.py --config=experiments/configs/tiny.py --workdir=/tmp/kimi_tiny \
        --config.steps=300 --config.model.num_hidden_layers=4

Multi-host: on TPU VMs and SLURM `jax.distributed.initialize()` finds the cluster by itself (--distributed=auto);
elsewhere pass --coordinator_address=host:port --num_processes=N --process_id=i. Under SLURM JAX assumes one
process per GPU (each process takes GPU $SLURM_LOCALID); with one process per node pass --local_device_ids=0,...,7
(launch/gpu/submit.py does). The mesh comes from config.mesh (kimi_jax.config.MeshConfig: one axis may be -1,
the remaining devices; dcn_* split axes across TPU slices).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/tiny", "Checkpoints, metrics.jsonl and TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize: auto = only on TPU pods / SLURM / when "
                                 "--coordinator_address is given.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None,
                                      "The accelerators this process drives (default: JAX's choice; under SLURM "
                                      "the GPU numbered $SLURM_LOCALID).")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives for multi-process CPU runs.")


def initialize_distributed():
    import jax
    explicit = _COORDINATOR.value is not None
    cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if _DISTRIBUTED.value == "off" or (_DISTRIBUTED.value == "auto" and not (explicit or cluster)):
        return
    if explicit and (_NUM_PROCESSES.value is None or _PROCESS_ID.value is None):
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    local = [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None
    if explicit:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   local_device_ids=local)
    else:
        jax.distributed.initialize(local_device_ids=local)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)    # orbax logs every save at INFO
    initialize_distributed()
    from kimi_jax.train.loop import train
    summary = train(_CONFIG.value, _WORKDIR.value)
    sample = summary.pop("sample", None)
    print(json.dumps(summary))
    if sample is not None:
        print("---- sample ----")
        print(sample)


if __name__ == "__main__":
    app.run(main)
