"""launch/gpu/submit.py: the dry run (sbatch / srun lines, environment, where each mesh axis lands), its mesh
errors, the XLA flags it sets, and two processes started through its srun step (srun faked on this machine, SLURM's
variables in the environment) training and checkpointing in both process layouts."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUBMIT = str(ROOT / "launch" / "gpu" / "submit.py")
SMALL = ["--config=experiments/configs/small.py", "--config.log_every=1", "--config.checkpoint_every=2",
         "--config.sample.max_new_tokens=0", "--config.optimizer.warmup_steps=1", "--config.steps=3"]


def submit(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, SUBMIT, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_dry_run_k2_on_4_nodes_prints_sbatch_and_srun_and_the_mesh():
    out = submit("--nodes=4", "--workdir=/shared/k2", "--partition=h100", "--config=experiments/configs/kimi_k2_1t.py",
                 "--config.mesh.expert=8", "--config.data.global_batch_size=1024", "--config.train.microbatches=32",
                 "--dry_run").stdout
    lines = out.splitlines()
    assert "cluster: 4 nodes x 8 GPUs = 32 GPUs, 32 processes (process_per_gpu)" in lines
    assert "mesh {'data': 1, 'fsdp': 4, 'expert': 8, 'tensor': 1}" in lines
    assert "  fsdp       4: across 4 nodes (InfiniBand), 1 per node" in lines
    assert "  expert     8: inside a node (NVLink)" in lines
    sbatch = next(l for l in lines if l.startswith("sbatch "))
    assert sbatch.startswith(f"sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --time=24:00:00 "
                             f"--job-name=kimi-jax --exclusive --output=/shared/k2/slurm-%j.out --partition=h100 "
                             f"--chdir={ROOT} {ROOT}/launch/gpu/train.sbatch --nodes=4 --workdir=/shared/k2")
    assert "--dry_run" not in sbatch
    srun = next(l for l in lines if " srun " in l)
    assert "NCCL_DEBUG=WARN" in srun and "--xla_gpu_enable_latency_hiding_scheduler=true" in srun
    assert "CUDA_CACHE_PATH=/tmp/kimi_jax_cache/cuda TRITON_CACHE_DIR=/tmp/kimi_jax_cache/triton " \
           "JAX_COMPILATION_CACHE_DIR=/shared/k2/jax_cache srun " in srun
    assert (f"srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --kill-on-bad-exit=1 --cpu-bind=none "
            f"--export=ALL --chdir={ROOT} ") in srun
    assert srun.endswith(f"{ROOT}/launch/train.py --config=experiments/configs/kimi_k2_1t.py --config.mesh.expert=8 "
                         f"--config.data.global_batch_size=1024 --config.train.microbatches=32 --workdir=/shared/k2 "
                         f"--distributed=on")                 # one process per GPU: JAX takes GPU $SLURM_LOCALID


def test_dry_run_one_process_per_node_passes_the_node_gpus():
    out = submit("--nodes=2", "--layout=process_per_node", "--workdir=/shared/t", "--config.mesh.data=-1",
                 "--dry_run").stdout
    assert "cluster: 2 nodes x 8 GPUs = 16 GPUs, 2 processes (process_per_node)" in out
    srun = next(l for l in out.splitlines() if " srun " in l)
    assert "--ntasks-per-node=1" in srun and srun.endswith("--local_device_ids=0,1,2,3,4,5,6,7")


def test_dry_run_without_slurm_prints_each_nodes_command():
    out = submit("--scheduler=none", "--nodes=2", "--node_rank=1", "--coordinator_address=node0:5555",
                 "--workdir=/shared/t", "--dry_run").stdout
    assert "cluster: 2 nodes x 8 GPUs = 16 GPUs, 2 processes (process_per_node)" in out
    cmd = out.splitlines()[-1]
    assert cmd.endswith("launch/train.py --workdir=/shared/t --coordinator_address=node0:5555 --num_processes=2 "
                        "--process_id=1 --local_device_ids=0,1,2,3,4,5,6,7")


@pytest.mark.parametrize("args, message", [
    (["--config=experiments/configs/kimi_k2_1t.py"],                    # K2's EP 16 on nodes of 8
     "config.mesh.expert=16 spans 2 nodes of 8 GPUs"),
    (["--config.mesh.tensor=16", "--config.mesh.data=1"], "config.mesh.tensor=16 spans 2 nodes of 8 GPUs"),
    (["--config.mesh.data=3"], "config.mesh: data=3 x fsdp=1 x expert=1 x tensor=1 = 3 does not equal the 16 devices"),
    (["--config.mesh.dcn_fsdp=2"], "config.mesh: 1 slices are not divisible by dcn_fsdp=2"),
    (["--config.data.global_batch_size=8"], "config.data.global_batch_size (8) must be divisible by the mesh's batch"),
])
def test_dry_run_mesh_errors_name_the_field(args, message):
    proc = submit("--nodes=2", "--workdir=/shared/t", *args, "--dry_run", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


def test_expert_parallelism_across_nodes_on_request():
    out = submit("--nodes=2", "--workdir=/shared/t", "--config=experiments/configs/kimi_k2_1t.py",
                 "--expert_across_nodes", "--dry_run").stdout
    assert "  expert    16: across 2 nodes (InfiniBand), 8 per node" in out


def test_xla_knows_every_gpu_flag():
    """XLA aborts on an unknown flag in XLA_FLAGS; the GPU flags parse in the CPU build too (one flag table). The
    flags are read from the srun line the dry run prints."""
    srun = next(l for l in submit("--workdir=/shared/t", "--dry_run").stdout.splitlines() if " srun " in l)
    env = dict(item.split("=", 1) for item in shlex.split(srun[:srun.index(" srun ")]))
    assert len(env["XLA_FLAGS"].split()) == 12
    run = lambda f: subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                                   env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f}, capture_output=True,
                                   text=True, timeout=120)
    good = run(env["XLA_FLAGS"])
    assert good.returncode == 0, good.stderr[-2000:]
    bad = run("--xla_gpu_no_such_flag=1")                 # the check can fail
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr


def _fake_srun(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests/launch/fake_srun.py'} \"$@\"\n")
    srun.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SRUN_JOB_ID": str(os.getpid()), "FAKE_SRUN_DEVICES": "4",
            "XLA_FLAGS": ""}


@pytest.mark.slow
@pytest.mark.parametrize("layout, nodes, gpus", [("process_per_gpu", 1, 2), ("process_per_node", 2, 4)])
def test_slurm_step_trains_and_checkpoints_on_two_processes(tmp_path, layout, nodes, gpus):
    """submit.py --in_allocation (what train.sbatch runs) execs srun; two tasks find each other through SLURM's
    variables (jax.distributed's SLURM detection), 4 CPU devices each, train 3 steps and checkpoint."""
    workdir = tmp_path / "run"
    proc = submit("--in_allocation", f"--nodes={nodes}", f"--gpus_per_node={gpus}", f"--layout={layout}",
                  f"--workdir={workdir}", f"--python={sys.executable}", f"--local_cache={tmp_path / 'cache'}",
                  *SMALL, env=_fake_srun(tmp_path))
    summaries = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{"step"')]
    assert len(summaries) == 2 and all(s["step"] == 3 for s in summaries)       # both processes finished
    assert summaries[0]["loss"] == summaries[1]["loss"]                          # one global computation
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert (tmp_path / "cache").is_dir()                                         # the node-local cache
    assert any((workdir / "jax_cache").iterdir())                 # process 0 wrote the compiled programs
