#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration
# tests (real Nix, real overlayfs, each test in its own mount namespace).
# Needs root; installs missing system packages itself.
#
#   scripts/test.sh                the suite against the host's Nix (bookworm: 2.8)
#   scripts/test.sh --modern-nix   and then once more against a modern Nix:
#                                  Debian trixie's nix-bin in a chroot
#
# tests/modern_nix.rs always uses both Nixes (one writes a lower, the other
# uses the merged store), so the chroot is made before the suite either way:
# scripts/modern-nix-chroot.sh caches it in /var/cache/nixfs-layer/nix-trixie
# (NIXFS_LAYER_MODERN_CHROOT for another place) and reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
modern=0
for arg in "$@"; do
  case $arg in
    --modern-nix) modern=1 ;;
    *) echo "usage: scripts/test.sh [--modern-nix]" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "the test suite mounts overlayfs and tmpfs in private namespaces: run it as root" >&2
  exit 1
fi
scripts/install-deps.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
chroot_dir=$(scripts/modern-nix-chroot.sh "${NIXFS_LAYER_MODERN_CHROOT:-/var/cache/nixfs-layer/nix-trixie}")

run_suite() { # [nextest filter]
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast ${1:+-E "$1"}
  else
    cargo test --locked --no-fail-fast
  fi
}

echo "== the suite against the host's Nix: $(nix-store --version)" >&2
NIXFS_LAYER_TEST_NIX=host NIXFS_LAYER_MODERN_CHROOT="$chroot_dir" run_suite
if [ $modern = 1 ]; then
  echo "== the suite against the chroot's Nix: $(cut -d" " -f1-3 "$chroot_dir/.nixfs-layer-complete")" >&2
  # tests/modern_nix.rs picks its Nixes itself: it ran above already.
  NIXFS_LAYER_TEST_NIX="chroot:$chroot_dir" run_suite 'not binary(modern_nix)'
fi
