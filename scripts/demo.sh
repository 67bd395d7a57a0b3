#!/usr/bin/env bash
# The main job end to end on a built-in example, in a private mount
# namespace (nothing is mounted on the host):
#   1. real Nix builds a small lower store (app -> libb -> liba, tool)
#   2. `nixfs-layer init` makes an upper, `nixfs-layer mount` stacks them on /nix
#   3. a new build on top of the lower paths lands in the upper only
#   4. `nixfs-layer status` shows the layers
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${NIXFS_LAYER_DEMO_INNER:-}" != 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "the demo mounts overlayfs: run it as root" >&2; exit 1; }
  scripts/install-deps.sh --demo
  cargo build --release --locked -q
  mkdir -p /nix
  exec env NIXFS_LAYER_DEMO_INNER=1 unshare -m --propagation private -- "$0" "$@"
fi

bin=$PWD/target/release/nixfs-layer
fixture=$PWD/tests/fixtures/store.nix
work=$(mktemp -d /tmp/nixfs-layer-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export NIX_REMOTE=local HOME=$work/home XDG_CACHE_HOME=$work/home/.cache
export NIX_CONFIG=$'build-users-group =\nsubstituters =\nsandbox = false\nexperimental-features = nix-command'
mkdir -p "$work/lower" "$HOME"
mount -t tmpfs demo /nix

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building a lower store with real Nix ($work/lower)"
mount --bind "$work/lower" /nix
nix-build --no-out-link "$fixture" -A app -A tool
umount /nix

say "nixfs-layer init --upper $work/upper"
"$bin" init --upper "$work/upper"
say "nixfs-layer mount --lower $work/lower --upper $work/upper"
"$bin" mount --lower "$work/lower" --upper "$work/upper" --no-flake-fs

say "every lower path is valid in the merged store"
nix path-info --all
say "a new build on top of them (on-top depends on app and tool)"
out=$(nix-build --no-out-link "$fixture" -A onTop)
"$out/bin/on-top"
echo "references: $(nix-store -q --references "$out" | tr '\n' ' ')"
say "it landed in the upper only"
ls "$work/upper/store" | grep -v -- -nixfs-layer-lowers
echo "(plus …-nixfs-layer-lowers, the path that keeps lower paths alive for Nix's GC)"
if ls "$work/lower/store" | grep -q on-top; then echo "the lower changed!" >&2; exit 1; fi
echo "(the lower has no on-top: $(ls "$work/lower/store" | wc -l) entries, as before)"

say "nixfs-layer status"
"$bin" status
"$bin" umount
