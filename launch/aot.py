"""Compile the train step of a config ahead of time for a TPU slice or a GPU cluster (no accelerator needed) and
print its per-device memory, FLOPs, collectives and a roofline step-time estimate.

    python launch/aot.py --config=experiments/configs/kimi_k2_1t.py --config.mesh.expert=8 --topology=v5p-512
    python launch/aot.py --config=experiments/configs/kimi_k2_1t.py --config.model.num_hidden_layers=4 \
        --topology=v5p-1024 --num_slices=2 --dcn=fsdp --json_out=/tmp/k2.json
    python launch/aot.py --config=experiments/configs/tiny.py --topology=h100-16

Topologies: v5p-N and v4-N (N TensorCores = 2 x chips, 3D torus), v5e-N and v6e-N (N chips, 2D), a raw libtpu
name (v5p:2x2x1), h100-N / h200-N / h800-N (N GPUs in nodes of 8; needs jax-cuda12-plugin and jax-cuda12-pjrt,
see requirements-aot.txt), or cpu (the local CPU devices, --cpu_devices of them). TPU topologies need libtpu
(jax[tpu]).
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compile-only: never initialise an attached accelerator. Set before anything imports jax (the config file does).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "Training config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "v5p-512, v6e-64, v5e-16, v4-128, v5p:2x2x1, h100-256, cpu.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN (multi-slice).")
_DCN = flags.DEFINE_enum("dcn", "data", ["data", "fsdp", "expert", "tensor"],
                         "With --num_slices > 1: the mesh axis split across slices.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "With --topology=cpu: number of host CPU devices.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the report as JSON here.")
_HLO_OUT = flags.DEFINE_string("hlo_out", None, "Write the optimized per-device HLO text here.")
# A program that does not fit in device memory is a result, not an error: the report says so ("fits": false,
# with XLA's numbers) and the exit status is 0.


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    topology = _TOPOLOGY.value
    if topology == "cpu":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}").strip()
    import jax
    from kimi_jax.train import aot, hlo_stats, loop

    config = _CONFIG.value
    family = None
    if topology == "cpu":
        devices = jax.devices("cpu")
    else:
        spec = aot.parse_topology(topology)
        family = spec.get("family")
        if spec["platform"] == "cuda":
            if _NUM_SLICES.value != 1:
                raise app.UsageError("--num_slices is for TPU slices; a GPU cluster's nodes are in --topology")
            devices = aot.gpu_topology(topology)
        else:
            devices = aot.tpu_topology(topology, _NUM_SLICES.value)
    if _NUM_SLICES.value > 1:
        mesh = aot.make_hybrid_mesh(config.mesh, devices, _NUM_SLICES.value, _DCN.value)
    else:
        mesh = loop.make_mesh(config.mesh, devices)
    compiled, report = aot.compile_and_analyze(config, devices, mesh=mesh, chip=aot.chip_for(devices, family))
    report["topology"] = topology + (f" x {_NUM_SLICES.value} slices (DCN axis {_DCN.value})"
                                     if _NUM_SLICES.value > 1 else "")
    report["commit"] = git_commit()
    print(aot.format_report(report))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            f.write(hlo_stats.to_json(report))
    if _HLO_OUT.value and compiled is not None:
        with open(_HLO_OUT.value, "w") as f:
            f.write(compiled.as_text())


if __name__ == "__main__":
    app.run(main)
