"""launch/tpu/submit.py and launch/tpu/worker.sh, offline: the dry run on v5p-512 and on 2 x v5p-256 (commands,
topology, where each mesh axis lands on libtpu's compile-only devices), its errors naming the config field, the
xpk path, and the worker script's streaming and failure report."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUBMIT = str(ROOT / "launch" / "tpu" / "submit.py")
GCLOUD = "--zone=us-east5-a --project=proj"
TINY = ["--config=experiments/configs/tiny.py", "--config.model.n_routed_experts=16",  # K2's EP 16 on a tiny model
        "--config.data.global_batch_size=256", "--config.mesh.fsdp=-1"]

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="the TPU dry run needs libtpu (requirements-aot.txt)")


def submit(*args, check=True):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, SUBMIT, "--name=k2", "--zone=us-east5-a", "--project=proj",
                           "--workdir=/mnt/shared/k2", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and not line.startswith(("#", " ", "=="))
            and not line.startswith(("topology:", "mesh ", "batch:"))]


@needs_libtpu
def test_dry_run_v5p_512():
    out = submit("--accelerator_type=v5p-512", *TINY, "--config.mesh.data=1", "--config.mesh.expert=16",
                 "--dry_run").stdout
    lines = out.splitlines()
    assert "topology: 1 x v5p-512 = 256 chips, 64 hosts (4 chips each)" in lines
    assert "mesh {'data': 1, 'fsdp': 16, 'expert': 16, 'tensor': 1} over 256 devices (TPU v5)" in lines
    assert "batch: 256 sequences of 256 tokens per step, 1 microbatch(es) of 256, 1 per batch shard" in lines
    assert "  fsdp      16: x 2, z 8" in lines and "  expert    16: x 2, y 8" in lines    # the 8x8x4 torus, split
    train = ("'--command=cd kimi-jax && bash launch/tpu/worker.sh --config=experiments/configs/tiny.py "
             "--config.model.n_routed_experts=16 --config.data.global_batch_size=256 --config.mesh.fsdp=-1 "
             "--config.mesh.data=1 --config.mesh.expert=16 "
             "--workdir=/mnt/shared/k2 --distributed=on'")
    assert commands(out) == [
        f"gcloud compute tpus tpu-vm describe k2 '--format=value(state)' {GCLOUD}",
        f"gcloud compute tpus tpu-vm create k2 --accelerator-type=v5p-512 --version=v2-alpha-tpuv5 {GCLOUD}",
        f"git -C {ROOT} archive --format=tar.gz -o /tmp/kimi-jax.tar.gz HEAD",
        f"gcloud compute tpus tpu-vm scp /tmp/kimi-jax.tar.gz 'k2:~/' --worker=all {GCLOUD}",
        f"gcloud compute tpus tpu-vm ssh k2 --worker=all '--command=mkdir -p kimi-jax && tar -xzf ~/kimi-jax.tar.gz "
        f"-C kimi-jax' {GCLOUD}",
        f"gcloud compute tpus tpu-vm ssh k2 --worker=all {train} {GCLOUD}",
    ]


@needs_libtpu
def test_dry_run_two_v5p_256_slices_data_over_dcn():
    out = submit("--accelerator_type=v5p-256", "--num_slices=2", "--spot", *TINY, "--config.mesh.data=2",
                 "--config.mesh.expert=16", "--dry_run").stdout
    lines = out.splitlines()
    assert "topology: 2 x v5p-256 = 256 chips, 64 hosts (4 chips each)" in lines
    assert "mesh {'data': 2, 'fsdp': 8, 'expert': 16, 'tensor': 1} over 256 devices (TPU v5)" in lines
    assert "  data       2: slice 2" in lines                              # data parallel across the slices
    assert "  fsdp       8: z 8" in lines and "  expert    16: x 4, y 4" in lines   # inside each 4x4x8 slice
    cmds = commands(out)
    assert cmds[1] == (f"gcloud compute tpus queued-resources create k2 --accelerator-type=v5p-256 "
                       f"--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=k2 --spot {GCLOUD}")
    assert cmds[4] == (f"gcloud compute tpus queued-resources scp /tmp/kimi-jax.tar.gz 'k2:~/' --node=all "
                       f"--worker=all {GCLOUD}")
    assert cmds[-1].startswith("gcloud compute tpus queued-resources ssh k2 --node=all --worker=all "
                               "'--command=cd kimi-jax && bash launch/tpu/worker.sh ")


@needs_libtpu
def test_dry_run_two_slices_fsdp_over_dcn():
    out = submit("--accelerator_type=v5p-256", "--num_slices=2", *TINY, "--config.mesh.data=1",
                 "--config.mesh.expert=16", "--config.mesh.dcn_data=1", "--config.mesh.dcn_fsdp=2",
                 "--dry_run").stdout
    assert "  fsdp      16: z 8, slice 2" in out.splitlines()


@needs_libtpu
@pytest.mark.parametrize("args, message", [
    (["--accelerator_type=v5p-256", "--num_slices=2", "--config.mesh.data=1", "--config.mesh.expert=16"],
     "config.mesh.data=1 cannot be split across config.mesh.dcn_data=2 slices"),
    (["--accelerator_type=v5p-512", "--config.mesh.data=3"], "config.mesh: 256 devices are not divisible by data=3"),
    (["--accelerator_type=v5p-512", "--config.mesh.data=1", "--config.data.global_batch_size=128"],
     "config.data.global_batch_size (128) must be divisible by the mesh's batch split"),
    (["--accelerator_type=v5p-512", "--config.mesh.tensor=0"], "config.mesh.tensor must be an integer >= 1 or -1"),
    (["--accelerator_type=v5p-512", "--config.mesh.data=1", "--config.mesh.expert=32"],
     "ModelConfig.n_routed_experts (16) is not divisible by the mesh 'expert' axis (32)"),
])
def test_dry_run_errors_name_the_field(args, message):
    proc = submit(*TINY, *args, "--dry_run", check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


@needs_libtpu
def test_dry_run_xpk():
    out = submit("--xpk_cluster=gke1", "--accelerator_type=v5p-256", "--num_slices=2", *TINY,
                 "--config.mesh.data=2", "--dry_run").stdout
    cmds = commands(out)
    assert cmds[0].startswith(f"xpk workload create --cluster=gke1 --project=proj --zone=us-east5-a --workload=k2 "
                              f"--tpu-type=v5p-256 --num-slices=2 --base-docker-image=python:3.12 "
                              f"--script-dir={ROOT} '--command=bash launch/tpu/worker.sh ")
    assert cmds[1] == "xpk workload list --cluster=gke1 --project=proj --zone=us-east5-a --wait-for-job-completion=k2"


def test_workdir_must_be_a_shared_path():
    proc = submit("--workdir=gs://bucket/run", "--dry_run", check=False)
    assert proc.returncode != 0 and "--workdir=gs://bucket/run: give an absolute path" in proc.stderr


def _worker(tmp_path, worker_id, *args):
    """worker.sh as TPU worker `worker_id`, its virtualenv this one's (marked installed: no pip)."""
    venv = tmp_path / "venv"
    if not venv.exists():
        venv.mkdir()
        for entry in pathlib.Path(sys.prefix).iterdir():
            if entry.name != ".installed":
                (venv / entry.name).symlink_to(entry)
        (venv / ".installed").touch()
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "TPU_WORKER_ID": str(worker_id),
           "KIMI_JAX_VENV": str(venv), "JAX_PLATFORMS": "cpu",
           "KIMI_JAX_LOG": str(tmp_path / f"log{worker_id}"), "KIMI_JAX_PIDFILE": str(tmp_path / "pid")}
    return subprocess.run(["bash", str(ROOT / "launch/tpu/worker.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_worker_script_reports_a_failure_with_its_log(tmp_path):
    """A worker whose train.py fails names itself, its exit status and the end of its log; worker 0 streams."""
    bad = ["--config=experiments/configs/tiny.py", "--config.mesh.data=3", f"--workdir={tmp_path / 'run'}",
           "--distributed=off"]
    one = _worker(tmp_path, 1, *bad)
    assert one.returncode == 1
    assert "== slice 0 worker 1 (" in one.stderr and "launch/train.py failed with exit status 1" in one.stderr
    message = "config.mesh: data=3 x fsdp=1 x expert=1 x tensor=1 = 3 does not equal the 1 devices"
    assert message in one.stderr                                                 # the end of its log
    assert message in (tmp_path / "log1").read_text() and not one.stdout
    zero = _worker(tmp_path, 0, *bad)
    assert message in zero.stdout                                                # streamed as it ran
    assert not (tmp_path / "pid").exists()


@needs_libtpu
@pytest.mark.slow
def test_dry_run_compiles_for_two_slices():
    """--compile: the train step of a 2-layer model compiled for 2 x v5p-256; its per-device memory is printed."""
    out = submit("--accelerator_type=v5p-256", "--num_slices=2", *TINY, "--config.mesh.data=2",
                 "--config.model.num_hidden_layers=2", "--dry_run", "--compile").stdout
    line = next(l for l in out.splitlines() if l.startswith("per-device memory: "))
    assert line.startswith("per-device memory: ") and " of 95.74 GiB HBM (parameters + optimizer state " in line
    total_mib = float(line.split()[2])
    assert line.split()[3] == "MiB" and 1 < total_mib < 1024, line


def test_dry_run_stop():
    cmds = commands(submit("--stop", "--accelerator_type=v5p-256", "--num_slices=2", "--dry_run").stdout)
    assert cmds == [f"gcloud compute tpus queued-resources ssh k2 --node=all --worker=all '--command=test -f "
                    f"~/kimi_jax_train.pid && kill $(cat ~/kimi_jax_train.pid) || true' {GCLOUD}"]
    cmds = commands(submit("--stop", "--xpk_cluster=gke1", "--dry_run").stdout)
    assert cmds == ["xpk workload delete --cluster=gke1 --project=proj --zone=us-east5-a --workload=k2"]


@needs_libtpu
def test_dry_run_clone_instead_of_copy():
    cmds = commands(submit("--accelerator_type=v5p-512", *TINY, "--config.mesh.data=1", "--code=clone",
                           "--repo_url=https://example.org/kimi-jax.git", "--branch=v1", "--dry_run").stdout)
    assert cmds[2] == ("gcloud compute tpus tpu-vm ssh k2 --worker=all '--command=git clone -q --depth=1 --branch=v1 "
                       "https://example.org/kimi-jax.git kimi-jax 2>/dev/null || (git -C kimi-jax fetch -q --depth=1 "
                       f"origin v1 && git -C kimi-jax checkout -q -f FETCH_HEAD)' {GCLOUD}")
    assert len(cmds) == 4


def _fake_gcloud(tmp_path, state: str) -> dict:
    """A `gcloud` that logs its arguments and answers `describe` with `state` ("" = not found)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        "#!/bin/sh\n"
        f"echo \"$*\" >> {tmp_path / 'calls'}\n"
        "case \"$*\" in *describe*) [ -n \"$FAKE_STATE\" ] && echo \"$FAKE_STATE\" && exit 0; exit 1;; esac\n")
    (bin_dir / "gcloud").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": state}


@pytest.mark.parametrize("state, created", [("READY", False), ("", True), ("PREEMPTED", True)])
def test_run_reuses_a_ready_slice_and_recreates_a_preempted_one(tmp_path, state, created):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **_fake_gcloud(tmp_path, state)}
    proc = subprocess.run([sys.executable, SUBMIT, "--name=k2", "--zone=z", "--project=p", "--workdir=/mnt/k2",
                           "--accelerator_type=v5p-8", "--code=clone", "--repo_url=https://example.org/r.git"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = [c.split(" --zone")[0] for c in (tmp_path / "calls").read_text().splitlines()]
    expected = ["compute tpus tpu-vm describe k2 --format=value(state)"]
    if state == "PREEMPTED":
        expected.append("compute tpus tpu-vm delete k2 --quiet")
    if created:
        expected.append("compute tpus tpu-vm create k2 --accelerator-type=v5p-8 --version=v2-alpha-tpuv5")
    assert calls[:-2] == expected
    assert calls[-2].startswith("compute tpus tpu-vm ssh k2 --worker=all --command=git clone")
    assert calls[-1].startswith("compute tpus tpu-vm ssh k2 --worker=all --command=cd kimi-jax && bash "
                                "launch/tpu/worker.sh --workdir=/mnt/k2 --distributed=on")
