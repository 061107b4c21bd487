"""Train on a Cloud TPU slice, or several slices joined over DCN, from your workstation.

    python launch/tpu/submit.py --name=k2 --zone=us-east5-a --project=my-proj --accelerator_type=v5p-512 \
        --workdir=/mnt/shared/k2 --config=experiments/configs/kimi_k2_1t.py --dry_run
    python launch/tpu/submit.py --name=k2 ... --accelerator_type=v5p-256 --num_slices=2 --config.mesh.data=2
    python launch/tpu/submit.py --xpk_cluster=my-gke --name=k2 ... --num_slices=2       # GKE through xpk

Creates the slice (a TPU VM, or a queued resource for --queued and every multi-slice run) unless it exists,
puts this checkout on every worker (a `git archive` of HEAD copied over, or a clone of --repo_url), and starts
launch/tpu/worker.sh on all workers of all slices (virtualenv once, then launch/train.py). Worker 0's log streams
back; a failing worker prints its message. --dry_run prints the commands and checks config.mesh against the
real topology (libtpu's compile-only devices; --compile adds the per-device memory of the compiled train step)
without touching the cloud. Run the same command again after a preemption: the slice is reused or recreated and
train.py resumes from the newest checkpoint in --workdir. --stop ends the run on every worker.
"""

import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the dry run compiles for TPU; it never opens an accelerator

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch.cluster import Step, config_args, mesh_report, print_steps, run_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "Training config file.")
_NAME = flags.DEFINE_string("name", None, "TPU VM / queued resource / xpk workload name.")
_ZONE = flags.DEFINE_string("zone", None, "GCP zone, e.g. us-east5-a.")
_PROJECT = flags.DEFINE_string("project", None, "GCP project.")
_TYPE = flags.DEFINE_string("accelerator_type", "v5p-8", "Slice type: v5p-512, v6e-256, v5e-64, v4-128, ...")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (multi-slice: config.mesh.dcn_*).")
_RUNTIME = flags.DEFINE_string("runtime_version", None, "TPU software version (default: by accelerator family).")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; rerun the same command to resume).")
_QUEUED = flags.DEFINE_bool("queued", False, "Create a single slice as a queued resource too.")
_CODE = flags.DEFINE_enum("code", "copy", ["copy", "clone"], "copy: git archive of HEAD; clone: --repo_url.")
_REPO = flags.DEFINE_string("repo_url", None, "With --code=clone: the git URL every worker clones.")
_BRANCH = flags.DEFINE_string("branch", "main", "With --code=clone: the branch or tag.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics: a directory every worker shares "
                               "(a gcsfuse or Filestore mount), the same path on all workers.")
_XPK = flags.DEFINE_string("xpk_cluster", None, "Run as an xpk workload on this GKE cluster instead.")
_IMAGE = flags.DEFINE_string("docker_image", None, "xpk: a ready image; default: python:3.12 + this checkout.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands and check the mesh; run nothing.")
_COMPILE = flags.DEFINE_bool("compile", False, "With --dry_run: also compile the train step for the topology and "
                             "print its per-device memory (minutes for a large model).")
_STOP = flags.DEFINE_bool("stop", False, "Stop the run on every worker (kills train.py by its pid file).")

RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
            "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "kimi-jax"          # the checkout on every worker, relative to the ssh user's home
ARCHIVE = "/tmp/kimi-jax.tar.gz"


def family(accelerator_type: str) -> str:
    fam = accelerator_type.split("-")[0]
    if fam not in RUNTIMES:
        raise app.UsageError(f"--accelerator_type={accelerator_type}: expected one of {sorted(RUNTIMES)}-<size>")
    return fam


def gcloud(*args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *args, f"--zone={_ZONE.value}", f"--project={_PROJECT.value}"]


def queued() -> bool:
    return _QUEUED.value or _SLICES.value > 1


def on_all_workers(command: str) -> list[str]:
    if queued():
        return gcloud("queued-resources", "ssh", _NAME.value, "--node=all", "--worker=all", f"--command={command}")
    return gcloud("tpu-vm", "ssh", _NAME.value, "--worker=all", f"--command={command}")


def create_steps() -> list[Step]:
    runtime = _RUNTIME.value or RUNTIMES[family(_TYPE.value)]
    spot = ["--spot"] if _SPOT.value else []
    if queued():
        nodes = ([f"--node-count={_SLICES.value}", f"--node-prefix={_NAME.value}"] if _SLICES.value > 1
                 else [f"--node-id={_NAME.value}"])
        return [Step("is the queued resource there? (state ACTIVE: reuse it; SUSPENDED / FAILED after a "
                     "preemption: delete it and create it again)",
                     gcloud("queued-resources", "describe", _NAME.value, "--format=value(state.state)"), check=False),
                Step("create it (only when it is not there)",
                     gcloud("queued-resources", "create", _NAME.value, f"--accelerator-type={_TYPE.value}",
                            f"--runtime-version={runtime}", *nodes, *spot)),
                Step("wait until it is ACTIVE (repeated every 60 s)",
                     gcloud("queued-resources", "describe", _NAME.value, "--format=value(state.state)"))]
    return [Step("is the TPU VM there? (READY: reuse it; PREEMPTED: delete it and create it again)",
                 gcloud("tpu-vm", "describe", _NAME.value, "--format=value(state)"), check=False),
            Step("create it (only when it is not there)",
                 gcloud("tpu-vm", "create", _NAME.value, f"--accelerator-type={_TYPE.value}", f"--version={runtime}",
                        *spot))]


def code_steps() -> list[Step]:
    if _CODE.value == "clone":
        if not _REPO.value:
            raise app.UsageError("--code=clone needs --repo_url")
        repo, branch = shlex.quote(_REPO.value), shlex.quote(_BRANCH.value)
        update = (f"git -C {REMOTE_DIR} fetch -q --depth=1 origin {branch} && "
                  f"git -C {REMOTE_DIR} checkout -q -f FETCH_HEAD")
        return [Step("clone (or update) the code on every worker", on_all_workers(
            f"git clone -q --depth=1 --branch={branch} {repo} {REMOTE_DIR} 2>/dev/null || ({update})"))]
    kind = ["queued-resources", "scp"] if queued() else ["tpu-vm", "scp"]
    nodes = ["--node=all"] if queued() else []
    return [Step("pack this checkout's HEAD (commit first: uncommitted changes are not sent)",
                 ["git", "-C", ROOT, "archive", "--format=tar.gz", "-o", ARCHIVE, "HEAD"]),
            Step("copy it to every worker", gcloud(*kind, ARCHIVE, f"{_NAME.value}:~/", *nodes, "--worker=all")),
            Step("unpack it on every worker", on_all_workers(
                f"mkdir -p {REMOTE_DIR} && tar -xzf ~/kimi-jax.tar.gz -C {REMOTE_DIR}"))]


def train_command() -> str:
    args = config_args(sys.argv) + [f"--workdir={_WORKDIR.value}", "--distributed=on"]
    return f"cd {REMOTE_DIR} && bash launch/tpu/worker.sh {shlex.join(args)}"


def xpk_steps() -> list[Step]:
    image = ([f"--docker-image={_IMAGE.value}"] if _IMAGE.value
             else ["--base-docker-image=python:3.12", f"--script-dir={ROOT}"])
    common = [f"--cluster={_XPK.value}", f"--project={_PROJECT.value}", f"--zone={_ZONE.value}"]
    args = config_args(sys.argv) + [f"--workdir={_WORKDIR.value}", "--distributed=on"]
    return [Step("submit the workload (xpk builds the image with this checkout, sets up multi-slice)",
                 ["xpk", "workload", "create", *common, f"--workload={_NAME.value}", f"--tpu-type={_TYPE.value}",
                  f"--num-slices={_SLICES.value}", *image,
                  f"--command=bash launch/tpu/worker.sh {shlex.join(args)}"]),
            Step("follow it until it ends", ["xpk", "workload", "list", *common,
                                             f"--wait-for-job-completion={_NAME.value}"])]


def steps() -> list[Step]:
    if _STOP.value and _XPK.value:
        return [Step("delete the workload", ["xpk", "workload", "delete", f"--cluster={_XPK.value}",
                                             f"--project={_PROJECT.value}", f"--zone={_ZONE.value}",
                                             f"--workload={_NAME.value}"])]
    if _STOP.value:
        return [Step("stop train.py on every worker", on_all_workers(
            "test -f ~/kimi_jax_train.pid && kill $(cat ~/kimi_jax_train.pid) || true"))]
    if _XPK.value:
        return xpk_steps()
    return [*create_steps(), *code_steps(), Step("train on every worker of every slice", on_all_workers(
        train_command()))]


def check_topology() -> list[str]:
    """config.mesh over the compile-only devices of the slice(s) (libtpu), as train.py will build it there."""
    from kimi_jax.train import aot
    family(_TYPE.value)
    devices = aot.tpu_topology(_TYPE.value, _SLICES.value)
    hosts = len({d.process_index for d in devices})
    lines = [f"topology: {_SLICES.value} x {_TYPE.value} = {len(devices)} chips, {hosts} hosts "
             f"({len(devices) // hosts} chips each)"]
    lines += mesh_report(_CONFIG.value, devices)
    if _COMPILE.value:
        _, report = aot.compile_and_analyze(_CONFIG.value, devices, mesh=None, chip=aot.chip_for(devices))
        mem = report.get("memory", {})
        if report.get("fits", True) and mem:
            lines.append(f"per-device memory: {_size(mem['total'])} of {_size(mem['hbm_capacity'])} HBM (parameters "
                         f"+ optimizer state {_size(mem['argument'])}, temporaries {_size(mem['temp'])}); compiled "
                         f"in {report['compile_seconds']:.0f} s")
        else:
            lines.append(f"per-device memory: DOES NOT FIT ({report.get('oom', {}).get('message', '')})")
    return lines


def wait_active() -> None:
    import subprocess
    import time
    describe = gcloud("queued-resources", "describe", _NAME.value, "--format=value(state.state)")
    while (state := subprocess.run(describe, capture_output=True, text=True).stdout.strip()) != "ACTIVE":
        if state in ("FAILED", "SUSPENDED"):
            sys.exit(f"error: queued resource {_NAME.value} is {state}")
        print(f"queued resource {_NAME.value}: {state or 'not found'}; waiting", flush=True)
        time.sleep(60)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def ensure_slice(plan: list[Step]) -> None:
    """Reuse a healthy slice, recreate a preempted one, create a missing one."""
    import subprocess
    describe, create = plan[0], plan[1]
    state = subprocess.run(describe.argv, capture_output=True, text=True).stdout.strip()
    if state in ("PREEMPTED", "SUSPENDED", "FAILED", "TERMINATED"):
        kind = "queued-resources" if queued() else "tpu-vm"
        run_step(Step(f"delete the {state} slice", gcloud(kind, "delete", _NAME.value, "--quiet",
                                                          *(["--force"] if queued() else []))))
        state = ""
    if not state:
        run_step(create)
    if queued():
        wait_active()


def main(argv):
    del argv
    for name, value in (("--name", _NAME.value), ("--zone", _ZONE.value), ("--project", _PROJECT.value)):
        if not value:
            raise app.UsageError(f"{name} is required")
    if not _STOP.value and not (_WORKDIR.value and _WORKDIR.value.startswith("/")):
        raise app.UsageError(f"--workdir={_WORKDIR.value}: give an absolute path that every worker shares (a "
                             f"gcsfuse / Filestore mount); gs:// URLs are not read directly")
    plan = steps()
    if _DRY_RUN.value:
        print(f"== TPU launch, dry run (nothing is run): {_NAME.value}")
        if not _STOP.value:
            try:
                print("\n".join(check_topology()))
            except (ValueError, RuntimeError) as e:   # a config field that does not fit; libtpu missing
                sys.exit(f"error: {e}")
        print_steps(plan)
        return
    if not (_STOP.value or _XPK.value):
        ensure_slice(plan)
        plan = plan[len(create_steps()):]
    for step in plan:
        run_step(step)


if __name__ == "__main__":
    app.run(main)
