"""Train on a multi-node GPU cluster (H100 / H800 / H200 nodes of 8 GPUs) under SLURM, or without it.

    python launch/gpu/submit.py --nodes=32 --workdir=/shared/k2 --config=experiments/configs/kimi_k2_1t.py \
        --partition=gpu --dry_run                                  # print sbatch / srun lines, check the mesh
    python launch/gpu/submit.py --nodes=32 --workdir=/shared/k2 --config=...        # sbatch it
    python launch/gpu/submit.py --layout=process_per_node ...                      # one process drives 8 GPUs
    python launch/gpu/submit.py --scheduler=none --coordinator_address=node0:1234 --node_rank=$RANK --nodes=4 ...

SLURM: `sbatch launch/gpu/train.sbatch` runs this file again inside the allocation (--in_allocation), which
starts one `srun` task per GPU (--layout=process_per_gpu: JAX's SLURM detection gives each the GPU numbered
$SLURM_LOCALID) or per node (--layout=process_per_node: train.py gets --local_device_ids=0,...,7), with the XLA
flags and NCCL settings of GPU_ENV and a cache directory on each node's local disk. srun --kill-on-bad-exit stops
every task when one fails. --scheduler=none prints or runs the command of one node (torchrun style: the same
command on every node with its --node_rank). --dry_run checks config.mesh against the cluster: the mesh is laid
out in process order, so its last axes (tensor, then expert) are the ones inside a node's NVLink domain.
GPU dry runs validate the mesh and print the commands; they do not compile (launch/aot.py --topology=h100-N does,
with the CUDA plugin of requirements-aot.txt). Resume after a failure or preemption: submit the same command
again; train.py resumes from the newest checkpoint in --workdir.
"""

import math
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch.cluster import Step, config_args, print_steps  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "Training config file.")
_NODES = flags.DEFINE_integer("nodes", 1, "Number of nodes.")
_GPUS = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node (one NVLink domain).")
_LAYOUT = flags.DEFINE_enum("layout", "process_per_gpu", ["process_per_gpu", "process_per_node"],
                            "One JAX process per GPU, or one per node driving all its GPUs.")
_SCHEDULER = flags.DEFINE_enum("scheduler", "slurm", ["slurm", "none"], "none: plain per-node commands.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics on a filesystem every node shares.")
_PARTITION = flags.DEFINE_string("partition", None, "sbatch --partition.")
_ACCOUNT = flags.DEFINE_string("account", None, "sbatch --account.")
_TIME = flags.DEFINE_string("time", "24:00:00", "sbatch --time.")
_JOB_NAME = flags.DEFINE_string("job_name", "kimi-jax", "sbatch --job-name.")
_LOCAL_CACHE = flags.DEFINE_string("local_cache", "/tmp/kimi_jax_cache", "Node-local cache directory.")
_PYTHON = flags.DEFINE_string("python", os.path.join(ROOT, ".venv/bin/python"), "Python on every node.")
_ENV = flags.DEFINE_multi_string("env", [], "Extra KEY=VALUE for every task (e.g. NCCL_IB_HCA=mlx5).")
_EXPERT_ACROSS_NODES = flags.DEFINE_bool("expert_across_nodes", False, "Allow config.mesh.expert x "
                                         "config.mesh.tensor to span nodes (all-to-all over InfiniBand).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "--scheduler=none: host:port of node 0.")
_NODE_RANK = flags.DEFINE_integer("node_rank", 0, "--scheduler=none: this node's index.")
_IN_ALLOCATION = flags.DEFINE_bool("in_allocation", False, "Set by train.sbatch: start the srun step now.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands and check the mesh; run nothing.")

# Each XLA flag with why (Hopper, JAX 0.12's XLA; tests/launch/test_gpu_launch.py checks that XLA knows them).
XLA_GPU_FLAGS = [
    ("--xla_gpu_enable_latency_hiding_scheduler=true", "schedule collectives early so they overlap compute"),
    ("--xla_gpu_enable_pipelined_all_gather=true", "prefetch the next scanned layer's FSDP weight gather"),
    ("--xla_gpu_enable_pipelined_reduce_scatter=true", "overlap a layer's gradient reduce-scatter with the next"),
    ("--xla_gpu_enable_pipelined_all_reduce=true", "the same for the all-reduces inside the layer loop"),
    ("--xla_gpu_enable_while_loop_double_buffering=true", "double-buffer the layer scan so the overlap can start"),
    ("--xla_gpu_all_gather_combine_threshold_bytes=134217728", "one NCCL call for a layer's many weight gathers"),
    ("--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864", "likewise for the gradient reduce-scatters"),
    ("--xla_gpu_all_reduce_combine_threshold_bytes=134217728", "likewise for the small replicated-leaf all-reduces"),
    ("--xla_gpu_enable_highest_priority_async_stream=true", "collectives' stream first, so compute does not starve it"),
    ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL", "CUDA graphs for kernels, never for NCCL calls"),
    ("--xla_gpu_enable_triton_gemm=false", "cuBLAS for the dense matmuls (faster than Triton GEMMs on Hopper)"),
]
# NCCL and runtime settings, each with why.
GPU_ENV = [
    ("NCCL_DEBUG", "WARN", "a failing collective says why in the log"),
    ("NCCL_CROSS_NIC", "0", "rail-optimised fabrics: rings stay on the same NIC rail across nodes"),
    ("NCCL_NVLS_ENABLE", "1", "NVLink SHARP (NVSwitch reductions) for the in-node all-reduce"),
    ("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92", "JAX preallocates 92% of each GPU (default 75%)"),
]


def gpu_env() -> dict[str, str]:
    """Every task's environment: XLA flags, NCCL settings, and caches kept across jobs (a resumed job finds its
    programs compiled and its kernels autotuned): what every process writes for itself (CUDA's JIT cache, Triton's
    kernels, XLA's autotune results) on the node's local disk under --local_cache; JAX's compilation cache, which
    only process 0 writes and every process reads, in <workdir>/jax_cache."""
    cache = _LOCAL_CACHE.value
    env = {k: v for k, v, _ in GPU_ENV}
    env["XLA_FLAGS"] = " ".join([f for f, _ in XLA_GPU_FLAGS] +
                                [f"--xla_gpu_per_fusion_autotune_cache_dir={cache}/autotune"])
    env.update(CUDA_CACHE_PATH=f"{cache}/cuda", TRITON_CACHE_DIR=f"{cache}/triton",
               JAX_COMPILATION_CACHE_DIR=os.path.join(_WORKDIR.value, "jax_cache"))
    for item in _ENV.value:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--env={item}: expected KEY=VALUE")
        env[key] = value
    return env


def layout() -> str:
    """--layout; without SLURM always one process per node (the command each node runs)."""
    return "process_per_node" if _SCHEDULER.value == "none" else _LAYOUT.value


def tasks_per_node() -> int:
    return _GPUS.value if layout() == "process_per_gpu" else 1


def train_argv(distributed: list[str], per_node: bool) -> list[str]:
    """launch/train.py with the config arguments, the workdir, how it joins the others, and for a process that
    drives a whole node its GPUs (JAX would otherwise take only GPU $SLURM_LOCALID)."""
    argv = [_PYTHON.value, os.path.join(ROOT, "launch/train.py"), *config_args(sys.argv),
            f"--workdir={_WORKDIR.value}", *distributed]
    if per_node:
        argv.append("--local_device_ids=" + ",".join(map(str, range(_GPUS.value))))
    return argv


def srun_step() -> Step:
    return Step(f"{_NODES.value} nodes x {tasks_per_node()} task(s): train", [
        "srun", f"--nodes={_NODES.value}", f"--ntasks-per-node={tasks_per_node()}",
        f"--gpus-per-node={_GPUS.value}", "--kill-on-bad-exit=1", "--cpu-bind=none", "--export=ALL",
        f"--chdir={ROOT}", "bash", "-c", f'mkdir -p {shlex.quote(_LOCAL_CACHE.value)} && exec "$@"', "task",
        *train_argv(["--distributed=on"], layout() == "process_per_node")], env=gpu_env())


def sbatch_step() -> Step:
    opts = [f"--nodes={_NODES.value}", f"--ntasks-per-node={tasks_per_node()}", f"--gpus-per-node={_GPUS.value}",
            f"--time={_TIME.value}", f"--job-name={_JOB_NAME.value}", "--exclusive",
            f"--output={_WORKDIR.value}/slurm-%j.out"]
    opts += [f"--partition={_PARTITION.value}"] * bool(_PARTITION.value)
    opts += [f"--account={_ACCOUNT.value}"] * bool(_ACCOUNT.value)
    passed = [a for a in sys.argv[1:] if not a.startswith(("--dry_run", "--nodry_run"))]
    return Step("submit; inside the allocation train.sbatch runs this file with --in_allocation",
                ["sbatch", *opts, f"--chdir={ROOT}", os.path.join(ROOT, "launch/gpu/train.sbatch"), *passed])


def manual_step() -> Step:
    if not _COORDINATOR.value:
        raise app.UsageError("--scheduler=none needs --coordinator_address=host:port (node 0)")
    joins = [f"--coordinator_address={_COORDINATOR.value}", f"--num_processes={_NODES.value}",
             f"--process_id={_NODE_RANK.value}"]
    return Step(f"on node {_NODE_RANK.value} of {_NODES.value}: one process for its {_GPUS.value} GPUs (the same on "
                f"every node, each with its --node_rank)", train_argv(joins, per_node=True), env=gpu_env())


def check_mesh() -> list[str]:
    """config.mesh on nodes x gpus_per_node GPUs in process order (node-major, as jax.devices() lists them): which
    axes stay inside a node. Raises ValueError naming the field when tensor (always) or expert (unless
    --expert_across_nodes) would span nodes, and where loop.check_config / sharding.check_mesh object."""
    from jax.sharding import AbstractMesh
    from kimi_jax import sharding
    from kimi_jax.config import MESH_AXES, MeshConfig
    from kimi_jax.train import loop
    gpus, per_node = _NODES.value * _GPUS.value, _GPUS.value
    sizes, _ = MeshConfig.from_config(_CONFIG.value.mesh).resolve(gpus)
    lines = [f"cluster: {_NODES.value} nodes x {per_node} GPUs = {gpus} GPUs, {_NODES.value * tasks_per_node()} "
             f"processes ({layout()})", f"mesh {sizes}"]
    for axis in MESH_AXES:
        size = sizes[axis]
        stride = math.prod(sizes[a] for a in MESH_AXES[MESH_AXES.index(axis) + 1:])
        nodes = len({i * stride // per_node for i in range(size)})
        if size == 1:
            continue
        lines.append(f"  {axis:<7}{size:>5}: " + ("inside a node (NVLink)" if nodes == 1 else
                                                  f"across {nodes} nodes (InfiniBand), {size // nodes} per node"))
        if nodes > 1 and (axis == "tensor" or (axis == "expert" and not _EXPERT_ACROSS_NODES.value)):
            raise ValueError(
                f"config.mesh.{axis}={size} spans {nodes} nodes of {per_node} GPUs (config.mesh.tensor="
                f"{sizes['tensor']} inside it): its collectives would cross InfiniBand; keep config.mesh.expert x "
                f"config.mesh.tensor <= {per_node}" + ("" if axis == "tensor" else " or pass --expert_across_nodes"))
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    loop.check_config(_CONFIG.value, mesh)
    sharding.check_mesh(loop.model_config(_CONFIG.value.model), mesh)
    return lines


def main(argv):
    del argv
    if not (_WORKDIR.value and _WORKDIR.value.startswith("/")):
        raise app.UsageError(f"--workdir={_WORKDIR.value}: give an absolute path on a filesystem every node shares")
    if _IN_ALLOCATION.value:
        step = srun_step()
        print(f"# {step.what}\n{step.shell()}", flush=True)
        os.execvpe(step.argv[0], step.argv, {**os.environ, **step.env})
    if _DRY_RUN.value:
        print("== GPU launch, dry run (nothing is run; GPU dry runs check the mesh, they do not compile)")
        try:
            print("\n".join(check_mesh()))
        except ValueError as e:
            sys.exit(f"error: {e}")
        if _SCHEDULER.value == "slurm":
            print_steps([Step("the shared workdir (sbatch writes its log there)", ["mkdir", "-p", _WORKDIR.value]),
                         sbatch_step(), srun_step()])
        else:
            print_steps([manual_step()])
        return
    if _SCHEDULER.value == "slurm":
        os.makedirs(_WORKDIR.value, exist_ok=True)
    step = sbatch_step() if _SCHEDULER.value == "slurm" else manual_step()
    os.execvpe(step.argv[0], step.argv, {**os.environ, **step.env})


if __name__ == "__main__":
    app.run(main)
