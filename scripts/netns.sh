#!/usr/bin/env bash
# Runs CMD... inside private network, mount and pid namespaces, as the e2e scenarios require:
#   - only a loopback interface exists (brought up here), so nothing can reach the outside;
#     every 127.0.0.0/8 address can be bound on it (one per scenario);
#   - /etc/resolv.conf is replaced (bind mount, private to the namespace) by
#     "nameserver 127.0.0.1", so a stray use of the system resolver stays local;
#   - HERALD_E2E_NETNS=1 is exported (the e2e harness refuses to run without it).
# The exit code of CMD is propagated. When CMD ends (or is interrupted), any process still
# living in the namespace (a peer leaked by a crashed test binary) is killed, by pid; the
# private pid namespace (this shell is its init) also reaps daemons such as Postfix's master
# and guarantees nothing outlives the run. Needs root (unshare --net).
#
# Usage: scripts/netns.sh cargo test --ignore-rust-version -p herald-e2e --offline
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 CMD [ARGS...]" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "$0: needs root (unshare --net --mount --pid)" >&2
  exit 2
fi

# Everything below the unshare runs in the new namespaces only. unshare(1) makes the
# new mount namespace's propagation private: the bind mount (and the new /proc) never show
# outside.
# shellcheck disable=SC2016 # expanded by the inner shell
exec unshare --net --mount --pid --fork --mount-proc -- bash -c '
  set -euo pipefail
  ip link set lo up
  resolv=$(mktemp "${TMPDIR:-/tmp}/herald-netns-resolv.XXXXXX")
  echo "nameserver 127.0.0.1" >"$resolv"
  chmod 644 "$resolv"
  mount --bind "$resolv" /etc/resolv.conf
  rm -f "$resolv" # the mount keeps the file alive
  export HERALD_E2E_NETNS=1

  leftovers() {
    local p pid n=0
    for p in /proc/[0-9]*; do
      pid=${p#/proc/}
      [ "$pid" = "$$" ] && continue
      # Same network namespace as this shell (same nsfs inode): started in here.
      [ "$p/ns/net" -ef "/proc/$$/ns/net" ] 2>/dev/null || continue
      if kill -KILL "$pid" 2>/dev/null; then n=$((n + 1)); fi
    done
    if [ "$n" -gt 0 ]; then
      echo "netns.sh: killed $n leftover process(es) of the namespace" >&2
    fi
  }
  trap leftovers EXIT
  trap "exit 130" INT
  trap "exit 143" TERM
  rc=0
  "$@" || rc=$?
  exit "$rc"
' netns "$@"
