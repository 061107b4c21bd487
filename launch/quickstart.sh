#!/usr/bin/env bash
# Sets up everything on a fresh machine, then runs the main job or the tests.
#   bash launch/quickstart.sh train   # train the tiny preset on the built-in corpus, then sample from it
#   bash launch/quickstart.sh test    # the whole test suite on CPU (8 fake devices)
# Extra arguments are passed on (to launch/train.py or to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KIMI_JAX_VENV:-.venv}"

find_python() {
  for candidate in python3 python3.13 python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for version in $(pyenv versions --bare | grep -E '^3\.1[2-9]' | sort -rV); do
      echo "env PYENV_VERSION=$version python3"; return
    done
  fi
  echo "error: Python >= 3.12 is required (jax >= 0.11); none found" >&2; exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  $(find_python) -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import kimi_jax, jax, flax, optax, grain, orbax.checkpoint' 2>/dev/null ||
   [ requirements.txt -nt "$VENV/.installed" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  touch "$VENV/.installed"
fi
# Extra packages for this run, e.g. KIMI_JAX_EXTRA_PIP="libtpu==0.0.50.1" (CI: libtpu's compile-only TPU devices, so
# the TPU dry-run and ahead-of-time compile tests run instead of skipping).
if [ -n "${KIMI_JAX_EXTRA_PIP:-}" ]; then
  "$VENV/bin/python" -m pip install -q $KIMI_JAX_EXTRA_PIP
fi

mode="${1:-}"; shift || true
case "$mode" in
  train) exec "$VENV/bin/python" launch/train.py --config=experiments/configs/tiny.py "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest -n 2 -q tests "$@" ;;
  *) echo "usage: bash launch/quickstart.sh train|test [args...]" >&2; exit 2 ;;
esac
