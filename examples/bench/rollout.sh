#!/usr/bin/env bash
# Canary rollouts: from a failing canary's first failed answer to "canary at 0 on every
# proxy" (median and max over BAD_RUNS), and false rollbacks over HEALTHY_RUNS healthy
# canaries, at RATE requests a second through three proxies. Each run is a fresh mesh in
# one process (`rollout-bench`: a control plane, three proxies, two log services, all on
# loopback); see the binary's doc comment for what is timed.
#
#   examples/bench/rollout.sh              # the recorded run (into BENCHMARKS.md)
#   QUICK=1 examples/bench/rollout.sh      # a try: 3 + 3 runs, results under target/
#
# Knobs: BAD_RUNS (20) HEALTHY_RUNS (20) RATE (200) REPORT_INTERVALS ("500ms 2s": the
# proxies' report interval, one table each; 2s is the proxy's default)
# PROFILE (demo: builds without LTO; dev: the debug build the tests use) SKIP_BUILD=1
# RECORD (1 unless QUICK)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    BAD_RUNS=${BAD_RUNS:-3}; HEALTHY_RUNS=${HEALTHY_RUNS:-3}
    OUT_DIR=${OUT_DIR:-$REPO/target/bench-quick/rollout}; RECORD=${RECORD:-0}
else
    BAD_RUNS=${BAD_RUNS:-20}; HEALTHY_RUNS=${HEALTHY_RUNS:-20}
    OUT_DIR=${OUT_DIR:-$REPO/examples/bench/results/rollout}; RECORD=${RECORD:-1}
fi
RATE=${RATE:-200}
REPORT_INTERVALS=${REPORT_INTERVALS:-500ms 2s}
PROFILE=${PROFILE:-demo}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
# Cargo puts the dev profile's output in target/debug.
if [ "$PROFILE" = dev ]; then PROFILE_DIR=debug; else PROFILE_DIR=$PROFILE; fi
BIN=$TARGET_DIR/$PROFILE_DIR/rollout-bench

# shellcheck source=servers.sh
source "$REPO/examples/bench/servers.sh"
mkdir -p "$OUT_DIR"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$REPO" && cargo build --profile "$PROFILE" -p sluice-examples --bin rollout-bench)
fi
SUMMARY=$OUT_DIR/summary.md
: >"$SUMMARY"
for interval in $REPORT_INTERVALS; do
    "$BIN" --bad-runs "$BAD_RUNS" --healthy-runs "$HEALTHY_RUNS" --rate "$RATE" \
        --report-interval "$interval" >>"$SUMMARY" 2> >(tee "$OUT_DIR/runs-$interval.log" >&2)
    echo >>"$SUMMARY"
done
cat "$SUMMARY"
if [ "$RECORD" = 1 ]; then
    record_section "$REPO/BENCHMARKS.md" rollout-results "$SUMMARY" \
        "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, profile $PROFILE, \`examples/bench/rollout.sh\` (BAD_RUNS=$BAD_RUNS HEALTHY_RUNS=$HEALTHY_RUNS RATE=$RATE REPORT_INTERVALS=\"$REPORT_INTERVALS\"); the machine ran other builds at the same time."
fi
