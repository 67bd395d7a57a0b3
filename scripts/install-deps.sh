#!/usr/bin/env bash
# Installs what the tests and the demo need on a Debian machine, if missing:
# Nix (Debian's nix-bin), FUSE 3, util-linux's unshare/setpriv/nsenter, sqlite3, man,
# zstd/xz (export compression), /usr/bin/time (benchmarks), iproute2, sshfs
# and OpenSSH (vm-tests), and Python 3 (tests/packaging.rs compiles the NixOS
# VM tests' scripts), zsh and fish (their completions are tested).
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
# vm-tests: hosts in network namespaces, a Nix root served over sshfs.
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
command -v sshfs >/dev/null || need+=(sshfs)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v python3 >/dev/null || need+=(python3)
# tests/generated_docs.rs runs each shell's completion.
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
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
