#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration
# tests (real Nix, real overlayfs, each test in its own mount namespace).
# Needs root; installs missing system packages itself.
#
#   scripts/test.sh                the suite against the host's Nix (bookworm: 2.8)
#   scripts/test.sh --modern-nix   and then once more against a modern Nix:
#                                  Debian trixie's nix-bin in a chroot (the
#                                  tests that run the suite's Nix, see below)
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

# The second pass (--modern-nix) runs only the test binaries whose tests run
# the suite's Nix, the one NIXFS_LAYER_TEST_NIX names (World::nix, nix_ok,
# build, verify_contents, Stack: all through TestNix::from_env). Every
# other binary would repeat its first run word for word.
suite_nix_tests=(
  export_import   # exports built by World::build, imported, checked by nix-store
  fault_db        # Stack, builds through the merged store, nix path-info before/after
  fault_guard     # Stack, stock nix-store --delete/--gc/--optimise through World::nix
  fault_layout    # Stack throughout, nix-store --import
  fault_lowers    # lowers built and replaced with World::build, verify_contents
  flake_tree      # the lower is built and evaluated with World::nix_ok
  flake_security  # the same, plus a nix-daemon of the suite's Nix on the stack
  json_reports    # Stack, builds and collectors through World::nix
  layered_store   # Stack and World::nix throughout
  nix_daemon      # a nix-daemon of the suite's Nix on the stack, its clients
  lifecycle       # Stack, racing mounts through the tool
  promote         # builds with World::build, nix-store --verify on both sides
  publish         # flakes evaluated and built with the suite's Nix by publish
  schema          # compares init's schema with the one World::nix makes
  sync_robustness # lowers built with World::nix, verify_contents
  first_contact   # Stack: resolve and a clean stop of the flake tree
  verify_gc       # Stack, builds and collectors through World::nix
)
# Not in the second pass, and why:
other_tests=(
  modern_nix       # picks both Nixes itself (host and chroot): ran in the first pass
  packaging        # runs the host's nix-instantiate directly (Command::new)
  config_reference # the config parser against docs/configuration.md, no Nix
  generated_docs   # man pages and completions, no Nix
  rootless         # inside `run` Nix is the host's on PATH (and the chroot's, picked by one test itself)
  install          # make install into a temporary DESTDIR, no Nix
  vm_nfs_fleet     # Nix runs inside the test hosts via nsenter: the host's
  vm_spark_path    #   (tests/common/hosts.rs), whatever NIXFS_LAYER_TEST_NIX says
  vm_template_update
)
# (Nor the unit tests in src/: they run no Nix but the host's nix-store and
# nix-hash, by name.) A new tests/*.rs must be put in one list or the other.
for t in tests/*.rs; do
  t=$(basename "$t" .rs)
  case " ${suite_nix_tests[*]} ${other_tests[*]} " in
    *" $t "*) ;;
    *) echo "scripts/test.sh: tests/$t.rs is in neither suite_nix_tests nor other_tests" >&2; exit 1 ;;
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

run_suite() { # [--test NAME]…: every test binary and the unit tests when none
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast "$@"
  else
    cargo test --locked --no-fail-fast "$@"
  fi
}

echo "== the suite against the host's Nix: $(nix-store --version)" >&2
NIXFS_LAYER_TEST_NIX=host NIXFS_LAYER_MODERN_CHROOT="$chroot_dir" run_suite
if [ $modern = 1 ]; then
  echo "== the suite against the chroot's Nix: $(cut -d" " -f1-3 "$chroot_dir/.nixfs-layer-complete")" >&2
  # Only the binaries that run the suite's Nix (suite_nix_tests, above).
  only=()
  for t in "${suite_nix_tests[@]}"; do only+=(--test "$t"); done
  NIXFS_LAYER_TEST_NIX="chroot:$chroot_dir" run_suite "${only[@]}"
fi
