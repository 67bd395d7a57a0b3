#!/usr/bin/env bash
# Makes (or checks) a Debian trixie chroot holding trixie's nix-bin (Nix
# 2.26), the "modern Nix" the test suite runs against besides the host's.
#
#   scripts/modern-nix-chroot.sh [DIR]    default: /var/cache/nixfs-layer/nix-trixie
#
# Prints DIR on stdout when it is ready. A complete chroot is reused (the
# marker file DIR/.nixfs-layer-complete is written last); an incomplete one
# is thrown away and rebuilt. The build happens in a temporary directory
# next to DIR and is renamed into place, so a killed build never leaves a
# half-made DIR behind. Needs root and deb.debian.org (debootstrap is
# installed with apt-get if missing).
set -euo pipefail
dir=${1:-/var/cache/nixfs-layer/nix-trixie}
marker=.nixfs-layer-complete
suite=${NIXFS_LAYER_MODERN_SUITE:-trixie}
mirror=${NIXFS_LAYER_MODERN_MIRROR:-http://deb.debian.org/debian}

complete() {
  [ -f "$1/$marker" ] && [ -x "$1/usr/bin/nix-store" ] && [ -x "$1/usr/bin/nix" ]
}

# Build users as Debian's nix-setup-systemd makes them (group nixbld,
# nixbld1..10): the tests run a nix-daemon of this Nix that builds as them.
# Added to a chroot made before this step existed as well.
build_users() {
  local r=$1 n
  groupadd --root "$r" --force --system nixbld
  for n in $(seq 1 10); do
    grep -q "^nixbld$n:" "$r/etc/passwd" ||
      useradd --root "$r" --system --comment "Nix build user $n" --home-dir /var/empty \
        --gid nixbld --groups nixbld --no-user-group --shell /usr/sbin/nologin "nixbld$n"
  done
}

if complete "$dir"; then
  if ! grep -q '^nixbld10:' "$dir/etc/passwd"; then
    [ "$(id -u)" -eq 0 ] || { echo "adding build users to the modern-Nix chroot needs root" >&2; exit 1; }
    build_users "$dir"
  fi
  echo "$dir"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "building the modern-Nix chroot needs root (debootstrap)" >&2
  exit 1
fi
command -v debootstrap >/dev/null || {
  echo "installing: debootstrap" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}

parent=$(dirname "$dir")
mkdir -p "$parent"
# One build at a time per machine (nextest runs tests in parallel processes).
exec 9>"$parent/.$(basename "$dir").lock"
flock 9
if complete "$dir"; then
  echo "$dir"
  exit 0
fi

# Left-overs of killed builds, and an incomplete DIR.
rm -rf "$parent/.$(basename "$dir").build."* "$parent/.$(basename "$dir").old."*
if [ -e "$dir" ]; then
  echo "$dir is incomplete: rebuilding it" >&2
  mv "$dir" "$parent/.$(basename "$dir").old.$$"
  rm -rf "$parent/.$(basename "$dir").old.$$"
fi

tmp="$parent/.$(basename "$dir").build.$$"
mkdir "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "building the modern-Nix chroot ($suite's nix-bin) in $dir; takes a few minutes once" >&2
start=$(date +%s)
failed_log="$parent/$(basename "$dir").failed.log"
# libdbi-perl: nix-bin needs libdbd-sqlite3-perl, which needs the virtual
# perl-dbdabi-94 that debootstrap's resolver does not follow to libdbi-perl.
debootstrap --variant=minbase --include=nix-bin,libdbi-perl "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  tail -n 30 "$tmp.log" >&2
  { cat "$tmp.log"; cat "$tmp/debootstrap/debootstrap.log" 2>/dev/null; } >"$failed_log"
  rm -f "$tmp.log"
  echo "debootstrap failed; its log: $failed_log" >&2
  exit 1
}
rm -f "$tmp.log" "$failed_log"
# Not needed to run Nix, and large.
rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*
# The chroot's Nix must not find a store of its own: the tests bind theirs.
rm -rf "$tmp/nix"
mkdir -p "$tmp/nix"
# Nix needs /proc (/proc/self/exe) even to print its version.
in_chroot() {
  unshare -m --propagation private -- sh -c 'r=$1; shift; mount --rbind /proc "$r/proc" && exec chroot "$r" "$@"' sh "$tmp" "$@"
}
version=$(in_chroot nix-store --version)
in_chroot nix --extra-experimental-features nix-command --version >/dev/null
build_users "$tmp"
echo "$version" >&2
echo "$version built $(date -u +%FT%TZ) in $(($(date +%s) - start))s" >"$tmp/$marker"
trap - EXIT
mv "$tmp" "$dir"
echo "$dir"
