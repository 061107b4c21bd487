"""The K2 / Moonlight memory plan: compiles the real train step for real topologies with launch/aot.py (on a CPU
machine, `pip install -r requirements-aot.txt` first) and writes experiments/results/k2_memory_plan.md.

    python experiments/k2_memory_plan.py                      # every row (minutes per compile)
    python experiments/k2_memory_plan.py --only=K2_v5p512     # one row
    python experiments/k2_memory_plan.py --reuse=/tmp/plan    # rewrite the table from earlier JSON reports
"""

import json
import os
import pathlib
import subprocess
import sys

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
K2, ML = "experiments/configs/kimi_k2_1t.py", "experiments/configs/moonlight_16b_a3b.py"
# name -> (model, topology, launch/aot.py flags)
ROWS = {
    "K2_v5p512": ("Kimi K2 1T", "v5p-512", [f"--config={K2}", "--topology=v5p-512", "--config.mesh.expert=8"]),
    "K2_v5p512_pallas": ("Kimi K2 1T, Pallas attention + grouped matmul", "v5p-512",
                         [f"--config={K2}", "--topology=v5p-512", "--config.model.moe_impl=pallas",
                          "--config.model.pallas_backend=tpu"]),
    "K2_v5p1024": ("Kimi K2 1T", "v5p-1024", [f"--config={K2}", "--topology=v5p-1024",
                                             "--config.train.microbatches=32"]),
    "K2_2x_v5p512": ("Kimi K2 1T", "2 x v5p-512 (DCN)", [f"--config={K2}", "--topology=v5p-512", "--num_slices=2",
                                                        "--dcn=data", "--config.mesh.data=2",
                                                        "--config.train.microbatches=32"]),
    "K2_h100_256": ("Kimi K2 1T", "256 x H100 (32 nodes x 8)", [f"--config={K2}", "--topology=h100-256",
                                                               "--config.mesh.expert=8"]),
    "ML_v5p64": ("Moonlight 16B-A3B", "v5p-64", [f"--config={ML}", "--topology=v5p-64",
                                                 "--config.train.microbatches=16"]),
    "ML_v6e64": ("Moonlight 16B-A3B", "v6e-64", [f"--config={ML}", "--topology=v6e-64",
                                                 "--config.train.microbatches=8"]),
}
_ONLY = flags.DEFINE_list("only", None, "Rows to compile (default: all).")
_REUSE = flags.DEFINE_string("reuse", None, "Read <dir>/<row>.json instead of compiling.")
_OUT = flags.DEFINE_string("out", str(ROOT / "experiments/results/k2_memory_plan.md"), "Markdown to write.")

GIB = 2 ** 30


def compile_row(name: str, directory: pathlib.Path) -> None:
    out = directory / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "launch/aot.py"), *ROWS[name][2], f"--json_out={out}"]
    env = dict(os.environ, JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def row_text(name: str, report: dict) -> str:
    model, topology, _ = ROWS[name]
    axes = report["mesh"]["axes"]
    mesh = " x ".join(f"{k} {v}" for k, v in axes.items() if v > 1)
    m = report["model"]
    if not report.get("fits", True) and "oom" in report:
        need = report["oom"]["required"] / GIB
        memory = f"does not fit: {need:.1f} GiB of temps needed"
        return f"| {model} | {topology} | {mesh} | {m['microbatches']} | {memory} | | | | | |"
    mem = report["memory"]
    used = mem["used_fraction"]
    flops = report["flops"]["roofline"] / 1e15
    coll = report["collective_bytes"] / GIB
    roof = report["roofline_estimate"]
    return (f"| {model} | {topology} | {mesh} | {m['microbatches']} | {mem['argument'] / GIB:.1f} + "
            f"{mem['temp'] / GIB:.1f} = {mem['total'] / GIB:.1f} GiB of {mem['hbm_capacity'] / GIB:.1f} "
            f"({100 * used:.0f}%, {f'{100 * (1 - used):.0f}% free' if used <= 1 else 'does not fit'}) | "
            f"{flops:.2f} | {coll:,.0f} | "
            f"{roof['step_s']:.1f} s | {100 * roof['mfu']:.0f}% | {report['compile_seconds']:.0f} s |")


def main(argv):
    del argv
    directory = pathlib.Path(_REUSE.value or ROOT / "workdir" / "k2_memory_plan")
    directory.mkdir(parents=True, exist_ok=True)
    names = _ONLY.value or list(ROWS)
    if not _REUSE.value:
        for name in names:
            compile_row(name, directory)
    lines = ["| model | topology | mesh | microbatches | per-device memory: arguments + temps = total of HBM | "
             "PFLOP/device/step (HLO dots) | collective GiB/device/step | step time (estimate) | "
             "MFU (estimate) | compile |", "|---" * 10 + "|"]
    for name in names:
        path = directory / f"{name}.json"
        if path.exists():
            lines.append(row_text(name, json.loads(path.read_text())))
    text = pathlib.Path(_OUT.value).read_text() if pathlib.Path(_OUT.value).exists() else ""
    begin, end = "<!-- table -->", "<!-- /table -->"
    table = "\n".join(lines)
    if begin in text:
        text = text[:text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):]
    else:
        text = f"{begin}\n{table}\n{end}\n"
    pathlib.Path(_OUT.value).write_text(text)
    print(table)


if __name__ == "__main__":
    app.run(main)
