#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration
# tests (real Nix, real overlayfs, each test in its own mount namespace).
# Needs root; installs missing system packages itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "the test suite mounts overlayfs and tmpfs in private namespaces: run it as root" >&2
  exit 1
fi
scripts/install-deps.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
else
  cargo test --locked --no-fail-fast
fi
