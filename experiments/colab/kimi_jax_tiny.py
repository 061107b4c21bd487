# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # kimi-jax: train a tiny Kimi K2 on a Colab runtime
#
# The tiny preset has K2's architecture (Multi-head Latent Attention, a fine-grained MoE with a shared expert,
# the first layer dense) at laptop size. This notebook installs the package, trains it with MuonClip on the
# Python standard library's source (bytes; nothing is downloaded) for a few minutes, plots the loss and the max
# attention logit that QK-Clip holds below tau, samples text, exports a Hugging Face safetensors checkpoint and
# loads it back. It runs top to bottom on the free CPU runtime and on TPU / GPU runtimes.
#
# The paired `kimi_jax_tiny.py` (jupytext percent format) is the reviewable source of this notebook.

# %%
# Install: clone the repository and its pinned requirements (plus the runtime's accelerator build of jax).
# Skipped when this notebook runs inside a checkout that is already installed.
import os
import pathlib
import shutil
import subprocess
import sys

REPO_URL = os.environ.get("KIMI_JAX_REPO_URL", "")   # the git URL this notebook was opened from
STEPS = int(os.environ.get("KIMI_JAX_NOTEBOOK_STEPS", "300"))   # the tiny config's run (launch/quickstart.sh train)


def find_checkout() -> pathlib.Path | None:
    for path in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents):
        if (path / "kimi_jax" / "__init__.py").exists() and (path / "experiments" / "configs").is_dir():
            return path
    return None


repo = find_checkout()
if repo is None:
    if not REPO_URL:
        raise RuntimeError("set REPO_URL above (or KIMI_JAX_REPO_URL) to the kimi-jax git repository to install")
    repo = pathlib.Path("/content/kimi-jax" if pathlib.Path("/content").is_dir() else "kimi-jax").resolve()
    subprocess.run(["git", "clone", "-q", "--depth=1", REPO_URL, str(repo)], check=True)
    jax_pin = next(l for l in (repo / "requirements.txt").read_text().splitlines() if l.startswith("jax=="))
    extra = []
    if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ:
        extra = [jax_pin.replace("jax==", "jax[tpu]==")]
    elif shutil.which("nvidia-smi"):
        extra = [jax_pin.replace("jax==", "jax[cuda12]==")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(repo / "requirements.txt"), *extra],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(repo)], check=True)
sys.path.insert(0, str(repo))
os.chdir(repo)
print("kimi-jax checkout:", repo)

# %%
import jax

import kimi_jax
from experiments.configs.tiny import get_config
from kimi_jax.train import loop

print(f"jax {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind}")
cfg = kimi_jax.tiny()
counts = kimi_jax.count_params(cfg)
print(f"tiny preset: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts (top "
      f"{cfg.num_experts_per_tok}), {counts['total'] / 1e6:.2f}M parameters, {counts['activated'] / 1e6:.2f}M "
      f"activated per token")

# %% [markdown]
# ## Train
# `loop.train` is what `launch/train.py` runs: MuonClip (Muon + QK-Clip), checkpoints every 100 steps into the
# workdir (run the cell again and it resumes), `metrics.jsonl` with one line per logged step.

# %%
import json
import tempfile

config = get_config()
config.steps = STEPS
config.log_every = max(1, min(10, STEPS // 10))
config.mesh.data = jax.device_count()
config.data.global_batch_size = 16 * jax.device_count()
config.sample.max_new_tokens = 200
workdir = pathlib.Path(os.environ.get("KIMI_JAX_NOTEBOOK_WORKDIR", tempfile.mkdtemp(prefix="kimi_tiny_")))
summary = loop.train(config, str(workdir))                 # a workdir with checkpoints: resumes from the newest
last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
print(f"step {last['step']}: loss {last['loss']:.3f}, max attention logit {last['max_attention_logit']:.1f}")

# %% [markdown]
# ## Loss and the max attention logit
# QK-Clip rescales a head's query/key weights whenever its max logit passes tau (`config.optimizer.qk_clip_tau`).

# %%
import matplotlib.pyplot as plt

records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
steps = [r["step"] for r in records]
fig, (ax_loss, ax_logit) = plt.subplots(1, 2, figsize=(11, 3.5))
ax_loss.plot(steps, [r["loss"] for r in records])
ax_loss.set(xlabel="step", ylabel="loss (nats / byte)", title="training loss")
ax_logit.plot(steps, [r["max_attention_logit"] for r in records], label="max attention logit")
ax_logit.axhline(config.optimizer.qk_clip_tau, color="red", linestyle="--", label="QK-Clip tau")
ax_logit.set(xlabel="step", title="max attention logit")
ax_logit.legend()
plt.show()
print(f"loss: {records[0]['loss']:.3f} at step {steps[0]} -> {records[-1]['loss']:.3f} at step {steps[-1]}")

# %% [markdown]
# ## Sample

# %%
print(config.sample.prompt + summary["sample"])

# %% [markdown]
# ## Export to Hugging Face safetensors and load it back
# The export uses HF's DeepSeek-V3 names and layout (`config.json` + `model.safetensors`); it loads with
# `kimi_jax.load_hf` here and with transformers' `DeepseekV3ForCausalLM`.

# %%
import jax.numpy as jnp
import numpy as np

from kimi_jax.train.checkpointing import restore_model

hf_dir = workdir / "hf"
model = restore_model(str(workdir))
kimi_jax.save_hf(model, str(hf_dir))
print(sorted(p.name for p in hf_dir.iterdir()))
reloaded = kimi_jax.load_hf(str(hf_dir))
ids = jnp.asarray(np.frombuffer(b"def main():\n    return", np.uint8).astype(np.int32))[None]
difference = float(jnp.max(jnp.abs(model(ids) - reloaded(ids))))
print(f"max |logit difference| after the round trip: {difference:.2e}")
