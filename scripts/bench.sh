#!/usr/bin/env bash
# Throughput benchmark (issue 8): Herald against Postfix 3.7 as a relay and against the
# wire's ceiling (smtp-source -> smtp-sink), on this machine, counting at the sink.
#   1. scripts/install-deps.sh --test          (Postfix, dnsmasq, venv with nats-server 2.15)
#   2. cargo build --release -p herald -p herald-e2e --bins
#   3. target/release/bench inside scripts/netns.sh (private network and resolv.conf)
# The report (markdown) goes to stdout and to $CARGO_TARGET_DIR/bench/last.md; progress and
# per-figure lines go to stderr. No thresholds: the exit code is non-zero only when a figure
# failed or a message went missing. See BENCHMARKS.md for what is measured and how.
#
# Usage: scripts/bench.sh [--quick] [bench options: --messages N --reps R --sessions S
#                          --sizes 10240,102400 --warmup W --systems ceiling,herald,postfix]
#   --quick: 1,000 messages per figure, one repetition (a few minutes once built);
#   default: 20,000 messages per figure, 3 repetitions (median and spread);
#   --debug-build (bench.sh's own option): use the debug build (the one scripts/test.sh
#     makes) instead of a release build, for a smoke test of the harness where a release
#     build would take too long (scripts/test.sh's last step): its numbers say nothing
#     about Herald's speed.
# Env: HERALD_VENV, CARGO_TARGET_DIR, HERALD_E2E_KEEP=1 (keep the scenario dirs and logs).
# Needs root (network namespace, private Postfix instance).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

venv=${HERALD_VENV:-$root/.tools/venv}
target=${CARGO_TARGET_DIR:-$root/target}
case $target in /*) ;; *) target=$root/$target ;; esac

profile=release
args=()
for a in "$@"; do
  if [ "$a" = "--debug-build" ]; then profile=debug; else args+=("$a"); fi
done

scripts/install-deps.sh --test
if [ "$profile" = release ]; then
  cargo build --release --ignore-rust-version -p herald -p herald-e2e --bins
else
  echo "bench.sh: DEBUG build: a smoke test of the harness, not a measurement" >&2
  # The same build as scripts/test.sh's (same feature set): nothing to do after it.
  cargo build --ignore-rust-version --workspace --all-targets
fi

mkdir -p "$target/bench"
report=$target/bench/last.md
bin=$target/$profile
echo "==> scripts/netns.sh $bin/bench ${args[*]}" >&2
rc=0
scripts/netns.sh env PATH="$venv/bin:/usr/sbin:$PATH" HERALD_BIN="$bin/herald" \
  HERALD_VENV="$venv" "$bin/bench" "${args[@]}" | tee "$report" || rc=$?
echo "report: $report" >&2
exit "$rc"
