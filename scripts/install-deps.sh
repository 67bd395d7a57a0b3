#!/usr/bin/env bash
# Installs what the tests and the demo need on a Debian machine, if missing:
# Nix (Debian's nix-bin), FUSE 3, util-linux's unshare/setpriv, sqlite3, man,
# zstd/xz (export compression) and /usr/bin/time (benchmarks).
set -euo pipefail
need=()
command -v nix-store >/dev/null || need+=(nix-bin)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v unshare >/dev/null && command -v setpriv >/dev/null || need+=(util-linux)
command -v sqlite3 >/dev/null || need+=(sqlite3)
command -v man >/dev/null || need+=(man-db)
command -v zstd >/dev/null || need+=(zstd)
command -v xz >/dev/null || need+=(xz-utils)
[ -x /usr/bin/time ] || need+=(time)
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
