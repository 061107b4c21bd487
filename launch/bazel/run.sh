#!/usr/bin/env bash
# Installs Bazel 2.1.0 (the npm registry's @bazel/bazel-linux_x64 package: one self-contained binary with its
# JDK inside, checked against the registry's SHA-512) into a cache and runs it in this repository.
#   bash launch/bazel/run.sh                       # bazel test //...   (every test file, through pytest)
#   bash launch/bazel/run.sh test //:test_config   # one target
#   bash launch/bazel/run.sh build //...
# Needs the checkout's virtualenv (bash launch/quickstart.sh makes it) and, the first time, the npm registry.
# Cache: $KIMI_JAX_BAZEL_CACHE (default ~/.cache/kimi_jax/bazel): the binary and Bazel's output root.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=2.1.0
URL="https://registry.npmjs.org/@bazel/bazel-linux_x64/-/bazel-linux_x64-$VERSION.tgz"
SHA512="6a0e99c183096e57f562e3e135100cc8261fd7ae2663c8e1748c0f495148d423220519d20c90644a0eeb5487333e1fbc1a9ed30ea027a3d30c4e77d45f3c6880"
CACHE="${KIMI_JAX_BAZEL_CACHE:-$HOME/.cache/kimi_jax/bazel}"
BAZEL="$CACHE/bazel-$VERSION"

if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "launch/bazel/run.sh: the npm package used here is Linux x86_64 only (this is $(uname -sm))" >&2; exit 1
fi
if [ ! -x "$BAZEL" ]; then
  mkdir -p "$CACHE"
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  echo "downloading Bazel $VERSION from $URL" >&2
  curl -fsSL -o "$tmp/bazel.tgz" "$URL"
  echo "$SHA512  $tmp/bazel.tgz" | sha512sum --check --quiet
  tar -xzf "$tmp/bazel.tgz" -C "$tmp" package/bazel-$VERSION-linux-x86_64
  install -m 755 "$tmp/package/bazel-$VERSION-linux-x86_64" "$BAZEL"
fi
[ $# -gt 0 ] || set -- test //...
exec "$BAZEL" --output_user_root="$CACHE/output" --max_idle_secs=120 "$@"
