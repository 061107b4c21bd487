"""Training metrics: model FLOPs per token, MFU, and the writers (console progress bar, TensorBoard, JSONL).

FLOPs per token (training = 3 x forward, forward = 2 x multiply-adds):
    6 * N_matmul + 3 * L * heads * (qk_head_dim + v_head_dim) * S
where N_matmul is the activated parameters that multiply activations (everything `count_params` calls activated
except the input embedding table, a gather), and the second term is causal attention (q.k and p.v over on
average S/2 keys, forward 2 * S/2 * heads * (qk + v) per layer). MFU = achieved model FLOP/s / peak FLOP/s.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax

from kimi_jax.config import ModelConfig, count_params

# Dense bf16 peak FLOP/s per device (vendor figures). CPU has no meaningful peak: a nominal 1e11 per device is
# used so that MFU stays a comparable number on laptops; pass train.peak_flops_per_device to override.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
}
CPU_NOMINAL_PEAK = 1e11

logger = logging.getLogger(__name__)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    n_matmul = count_params(cfg)["activated"] - cfg.vocab_size * cfg.hidden_size
    attention = 3 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6.0 * n_matmul + attention


def peak_flops_per_device(override: float | None = None) -> float:
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return flops
    return CPU_NOMINAL_PEAK


class MetricsWriter:
    """Appends one JSON object per logged step to <workdir>/metrics.jsonl, writes TensorBoard events to
    <workdir>/tensorboard, and shows a tqdm progress bar (process 0 only).

    `initial_step` is the step the run starts from (the resumed checkpoint's, 0 for a fresh run). Lines of an
    earlier run for later steps (logged before it died, after its last checkpoint) are removed from
    metrics.jsonl first, so that the file keeps one line per step once this run logs those steps again."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._bar = self._tb = None
        if not self.enabled:
            return
        import tqdm
        from tensorboardX import SummaryWriter
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        drop_lines_after(path, initial_step)
        self._jsonl = open(path, "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        shown = {k: record[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu") if k in record}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=True)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._jsonl.close()


def drop_lines_after(path: str, step: int) -> int:
    """Rewrites the JSONL file `path` with one line per step up to `step`; returns how many lines went.

    Removed: lines whose "step" is > `step`, lines that are not a whole JSON object with a step (a write cut
    short), and all but the last line of a step logged twice (files written before abandoned steps were
    removed: the later line is the run that went on). The file is replaced atomically (a temporary file, then
    os.replace) and only when a line goes; a missing file stays missing."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    last = {}                                   # step -> index of its last line
    for i, line in enumerate(lines):
        logged = _step_of(line)
        if logged is not None and logged <= step:
            last[logged] = i
    kept = [lines[i] for i in sorted(last.values())]
    if len(kept) == len(lines):
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    logger.info("Removed %d lines of steps after %d (or repeated) from %s.", len(lines) - len(kept), step, path)
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    """The "step" of a whole metrics line (newline-terminated JSON object), else None."""
    if not line.endswith("\n"):
        return None
    try:
        return int(json.loads(line)["step"])
    except (ValueError, TypeError, KeyError):
        return None


def _plain(v):
    v = jax.device_get(v)
    if hasattr(v, "item"):
        v = v.item()
    return v
