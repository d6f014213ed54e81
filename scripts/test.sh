#!/usr/bin/env bash
# Runs every test of the project (the README's test command; .ci/run execs it):
#   1. scripts/install-deps.sh --test   (Postfix, dnsmasq, swaks, openssl, venv with
#                                        nats-server 2.15, dkimpy, pynacl, dnspython)
#   2. cargo build   --workspace --all-targets           (may fetch crates: outside the netns)
#   3. cargo clippy  --workspace --all-targets -D warnings
#   4. cargo fmt --all --check
#   5. cargo test    --workspace --offline --no-fail-fast, inside scripts/netns.sh (private network and
#      resolv.conf: nothing can reach the outside or the system resolver)
#   6. scripts/bench.sh --quick --debug-build: a smoke test of the benchmark harness on the
#      debug build (about 2 minutes; no thresholds: it fails only if a message is lost).
#      Skipped when TEST-FILTERs are given or HERALD_SKIP_BENCH=1.
# Every cargo command passes --ignore-rust-version (see TESTBED.md: mail-parser declares
# rust-version 1.98; everything builds and passes on 1.95).
#
# Usage: scripts/test.sh [TEST-FILTER...]   (filters are passed to the test binaries)
# Env:   HERALD_TEST_THREADS (default 4), HERALD_VENV, HERALD_BIN, CARGO_TARGET_DIR,
#        HERALD_E2E_KEEP=1 (keep every scenario dir, not only failed ones)
# Needs root (network namespace, private Postfix instances).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

venv=${HERALD_VENV:-$root/.tools/venv}
target=${CARGO_TARGET_DIR:-$root/target}
case $target in /*) ;; *) target=$root/$target ;; esac
herald_bin=${HERALD_BIN:-$target/debug/herald}
threads=${HERALD_TEST_THREADS:-4}

results=()
failed=0
test_log=$(mktemp "${TMPDIR:-/tmp}/herald-test.XXXXXX")
trap 'rm -f "$test_log"' EXIT

step() {
  local name=$1
  shift
  echo
  echo "==> [$name] $*"
  local start=$SECONDS rc=0
  "$@" || rc=$?
  local took=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    results+=("PASS  $name (${took}s)")
  else
    results+=("FAIL  $name (exit $rc, ${took}s)")
    failed=1
  fi
  return "$rc"
}

summary() {
  echo
  echo "==================== summary ===================="
  printf '  %s\n' "${results[@]}"
  if [ -s "$test_log" ]; then
    local passed=0 failed_n=0 ignored=0 p f i
    while read -r p f i; do
      passed=$((passed + p)) failed_n=$((failed_n + f)) ignored=$((ignored + i))
    done < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$test_log")
    echo "  tests: $passed passed, $failed_n failed, $ignored ignored"
    grep -E '^test .* \.\.\. FAILED$' "$test_log" | sed 's/^test /  failed: /; s/ \.\.\. FAILED$//'
    grep -E '^scenario .*: files and logs kept in ' "$test_log" | sed 's/^/  /'
  fi
  if [ "$failed" -eq 0 ]; then
    echo "  ALL PASSED"
  else
    echo "  FAILED"
  fi
}

run_tests() {
  scripts/netns.sh env PATH="$venv/bin:$PATH" HERALD_BIN="$herald_bin" HERALD_VENV="$venv" \
    cargo test --ignore-rust-version --workspace --offline --no-fail-fast -- --test-threads "$threads" "$@" \
    2>&1 | tee "$test_log"
  return "${PIPESTATUS[0]}"
}

if ! step install-deps scripts/install-deps.sh --test; then
  summary
  exit 1
fi
if ! step build cargo build --ignore-rust-version --workspace --all-targets; then
  summary
  exit 1
fi
step clippy cargo clippy --ignore-rust-version --workspace --all-targets -- -D warnings
step fmt cargo fmt --all -- --check
step "test (netns)" run_tests "$@"
if [ "$#" -eq 0 ] && [ "${HERALD_SKIP_BENCH:-0}" != 1 ]; then
  step "bench smoke (debug build, no thresholds)" scripts/bench.sh --quick --debug-build
fi

summary
exit "$failed"
