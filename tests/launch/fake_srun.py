"""A stand-in for SLURM's `srun` on one machine, for tests: starts --nodes x --ntasks-per-node copies of the
command with the variables srun gives each task (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
SLURM_LOCALID, SLURM_NODEID, ...), every "node" being this machine with FAKE_SRUN_DEVICES CPU devices; with
--kill-on-bad-exit=1 a failing task ends the others. Exits with the first non-zero status, else 0."""

import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    opts, i = {}, 0
    while i < len(argv) and argv[i].startswith("--"):
        key, _, value = argv[i][2:].partition("=")
        opts[key] = value
        i += 1
    command = argv[i:]
    nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
    devices = os.environ.get("FAKE_SRUN_DEVICES", "4")
    procs = []
    for node in range(nodes):
        for local in range(per_node):
            env = dict(os.environ, SLURM_JOB_ID=os.environ.get("FAKE_SRUN_JOB_ID", "4242"),
                       SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES=str(nodes),
                       SLURM_NTASKS=str(nodes * per_node), SLURM_PROCID=str(node * per_node + local),
                       SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                       XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}")
            procs.append(subprocess.Popen(command, env=env, cwd=opts.get("chdir")))
    status = 0
    while any(p.poll() is None for p in procs):
        bad = [p.returncode for p in procs if p.returncode]
        if bad and opts.get("kill-on-bad-exit") == "1":
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
        status = status or p.returncode
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
