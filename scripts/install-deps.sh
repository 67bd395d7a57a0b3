#!/usr/bin/env bash
# Installs what the tests and the demo need on a Debian machine, if missing:
# Nix (Debian's nix-bin), FUSE 3, util-linux's unshare/setpriv/nsenter, sqlite3, man,
# zstd/xz (export compression), /usr/bin/time (benchmarks), iproute2, sshfs
# and OpenSSH (vm-tests), nix-setup-systemd (Debian's multi-user Nix: the
# nixbld build users and nix-daemon's units, for the nix-daemon tests), Python 3 (tests/packaging.rs compiles the NixOS
# VM tests' scripts), zsh and fish (their completions are tested).
#
#   scripts/install-deps.sh          what the test suite needs
#   scripts/install-deps.sh --demo   only what scripts/demo.sh uses (Nix, unshare)
#   … --list                         print the packages the mode needs, install nothing
set -euo pipefail
demo=0 list=0
for arg in "$@"; do
  case $arg in
    --demo) demo=1 ;;
    --list) list=1 ;;
    *) echo "usage: scripts/install-deps.sh [--demo] [--list]" >&2; exit 2 ;;
  esac
done

# One line per package: the package and the shell test that tells it is there.
demo_deps='nix-bin|command -v nix-store
util-linux|command -v unshare'
test_deps='fuse3|command -v fusermount3
nix-setup-systemd|getent group nixbld
util-linux|command -v setpriv
sqlite3|command -v sqlite3
man-db|command -v man
zstd|command -v zstd
xz-utils|command -v xz
time|[ -x /usr/bin/time ]
iproute2|command -v ip
util-linux|command -v nsenter
sshfs|command -v sshfs
openssh-server|[ -x /usr/sbin/sshd ]
openssh-client|command -v ssh-keygen
python3|command -v python3
zsh|command -v zsh
fish|command -v fish'
deps=$demo_deps
[ "$demo" -eq 1 ] || deps+=$'\n'$test_deps

if [ "$list" -eq 1 ]; then
  cut -d'|' -f1 <<<"$deps" | sort -u
  exit 0
fi
need=()
while IFS='|' read -r pkg check; do
  eval "$check" >/dev/null 2>&1 && continue
  case " ${need[*]} " in *" $pkg "*) ;; *) need+=("$pkg") ;; esac
done <<<"$deps"
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]}; run as root so they can be installed with apt-get" >&2
    exit 1
  fi
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
