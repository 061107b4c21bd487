"""What the pod and cluster launchers (launch/tpu/submit.py, launch/gpu/submit.py) share: the training config
arguments they pass on, the mesh check against a device set, and running (or, dry, printing) shell commands."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field


def config_args(argv: list[str]) -> list[str]:
    """The --config=... and --config.<field>=... arguments of argv, in order: what train.py gets on every host."""
    out, it = [], iter(argv[1:])
    for arg in it:
        if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
            out += [arg, next(it, "")]                 # "--config.x value" form
        elif arg.startswith(("--config=", "--config.")):
            out.append(arg)
    return out


def mesh_report(config, devices) -> list[str]:
    """Builds config.mesh over `devices` exactly as train.py does (loop.make_mesh; multi-slice TPU devices get the
    DCN split of config.mesh.dcn_*) and checks the batch (loop.check_config) and the model (sharding.check_mesh:
    heads, experts, MLP widths divisible by their axes) against it. Returns printable lines; a ValueError names
    the config field that is wrong."""
    from kimi_jax import sharding
    from kimi_jax.train import aot, loop
    mesh = loop.make_mesh(config.mesh, devices)
    loop.check_config(config, mesh)
    sharding.check_mesh(loop.model_config(config.model), mesh)
    batch, micro = config.data.global_batch_size, config.train.microbatches
    lines = [f"mesh {dict(mesh.shape)} over {len(devices)} devices ({devices[0].device_kind})",
             f"batch: {batch} sequences of {config.data.seq_len} tokens per step, {micro} microbatch(es) of "
             f"{batch // micro}, {batch // micro // sharding.batch_divisor(mesh)} per batch shard"]
    for axis, spans in aot.describe_mesh(mesh)["physical"].items():
        lines.append(f"  {axis:<7}{mesh.shape[axis]:>5}: " + ", ".join(f"{k} {v}" for k, v in spans.items()))
    return lines


@dataclass
class Step:
    """One command of a launch: what it does, the argv, and whether a failure stops the launch."""
    what: str
    argv: list[str]
    check: bool = True
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def print_steps(steps: list[Step], out=sys.stdout) -> None:
    for i, step in enumerate(steps, 1):
        print(f"# {i}. {step.what}", file=out)
        print(step.shell(), file=out)


def run_step(step: Step) -> int:
    """Runs one step with its output streaming to this terminal; a failing checked step exits with its status."""
    print(f"# {step.what}\n{step.shell()}", flush=True)
    rc = subprocess.run(step.argv, env={**os.environ, **step.env}).returncode
    if rc and step.check:
        print(f"error: '{step.what}' failed with exit status {rc}", file=sys.stderr)
        sys.exit(rc)
    return rc
