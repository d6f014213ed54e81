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
#                          --sizes 10240,102400 --warmup W --systems ceiling,herald,postfix
#                          --latency-messages N --latency-rate R,R --latency-connections C
#                          --delivery-processes 1,2,4 --perf --perf-call-graph fp|dwarf]
#   --quick: 1,000 messages per figure, one repetition (a few minutes once built);
#   default: 20,000 messages per figure, 3 repetitions (median and spread);
#   --perf: also profile Herald's ingress and delivery (perf record -e cpu-clock) during one
#     extra figure per size; the release build then carries line tables
#     (--config profile.release.debug="line-tables-only": the same code, other artifacts,
#     so a cold build the first time; switching back and forth then rebuilds only what
#     changed). Full perf reports go to $CARGO_TARGET_DIR/bench/perf-*.txt.
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
build_config=()
for a in "$@"; do
  case $a in
    --debug-build) profile=debug ;;
    --perf | --perf-call-graph)
      # perf needs symbols (a release build keeps them) and, for inlined frames and
      # `perf report --call-graph` with dwarf unwinding, line tables.
      build_config=(--config 'profile.release.debug="line-tables-only"')
      args+=("$a")
      ;;
    *) args+=("$a") ;;
  esac
done

scripts/install-deps.sh --test
if [ "$profile" = release ]; then
  cargo build --release --ignore-rust-version "${build_config[@]}" -p herald -p herald-e2e --bins
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
  HERALD_VENV="$venv" "$bin/bench" --out-dir "$target/bench" "${args[@]}" | tee "$report" || rc=$?
echo "report: $report" >&2
exit "$rc"
