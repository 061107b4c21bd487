#!/usr/bin/env bash
# Runs on every TPU worker (launch/tpu/submit.py starts it on all workers of all slices at once):
# sets up the virtualenv once, then runs launch/train.py with the given arguments.
#   bash launch/tpu/worker.sh --config=experiments/configs/kimi_k2_1t.py --workdir=/mnt/shared/k2 ...
# Worker 0 of slice 0 streams its log to the launching terminal; every worker writes its own log to
# $KIMI_JAX_LOG (default ~/kimi_jax_train.log). A worker that fails prints who it is, its exit status and the end
# of its log, and exits with that status; the others stop when JAX's coordination service notices
# (jax.distributed: a missing task fails every task).
set -uo pipefail
cd "$(dirname "$0")/../.."
VENV="${KIMI_JAX_VENV:-.venv}"
LOG="${KIMI_JAX_LOG:-$HOME/kimi_jax_train.log}"
PIDFILE="${KIMI_JAX_PIDFILE:-$HOME/kimi_jax_train.pid}"

worker_id() {   # GKE (xpk) sets TPU_WORKER_ID; a TPU VM has it in its metadata
  if [ -n "${TPU_WORKER_ID:-}" ]; then echo "$TPU_WORKER_ID"; return; fi
  curl -sf -m 5 -H Metadata-Flavor:Google \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0
}

python312() {   # TPU VM images may ship an older Python: fall back to a uv-managed 3.12
  for candidate in python3.13 python3.12 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
      echo "$candidate"; return
    fi
  done
  python3 -m pip install -q --user uv >&2 && python3 -m uv python install 3.12 >&2 && python3 -m uv python find 3.12
}

setup_venv() {   # requirements.txt plus the TPU runtime pinned in requirements-aot.txt (jax[tpu], libtpu)
  if [ -x "$VENV/bin/python" ] && [ ! requirements.txt -nt "$VENV/.installed" ]; then return; fi
  "$(python312)" -m venv "$VENV" &&
  "$VENV/bin/python" -m pip install -q --upgrade pip &&
  "$VENV/bin/python" -m pip install -q -r requirements.txt $(grep -E '^(jax\[tpu\]|libtpu)==' requirements-aot.txt) &&
  "$VENV/bin/python" -m pip install -q --no-deps -e . &&
  touch "$VENV/.installed"
}

WORKER="$(worker_id)"
SLICE="${MEGASCALE_SLICE_ID:-0}"
WHO="slice $SLICE worker $WORKER ($(hostname))"
if ! setup_venv >"$LOG.setup" 2>&1; then
  echo "== $WHO: virtualenv setup failed; the end of $LOG.setup:" >&2
  tail -n 30 "$LOG.setup" >&2
  exit 1
fi

if [ "$SLICE" = 0 ] && [ "$WORKER" = 0 ]; then
  "$VENV/bin/python" launch/train.py "$@" > >(tee "$LOG") 2>&1 &
else
  "$VENV/bin/python" launch/train.py "$@" >"$LOG" 2>&1 &
fi
pid=$!
echo "$pid" >"$PIDFILE"
wait "$pid"
rc=$?
rm -f "$PIDFILE"
if [ "$rc" -ne 0 ]; then
  echo "== $WHO: launch/train.py failed with exit status $rc; the end of $LOG:" >&2
  tail -n 40 "$LOG" >&2
fi
exit "$rc"
