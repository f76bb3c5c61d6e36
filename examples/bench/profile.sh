#!/usr/bin/env bash
# Where Sluice's time goes under load: `perf` samples the proxy (one worker thread, the
# full governance stack of run.sh, or one plain route with PLAIN=1) while wrk (HTTP/1.1)
# or h2load (PROTO=h2) saturates it, and prints a flat profile by shared object and by
# symbol.
#
#   examples/bench/profile.sh               # writes target/bench-profile/report.txt
#   PLAIN=1 PROTO=h2 DURATION=20 examples/bench/profile.sh
#
# Installs `linux-perf` and the load tools if missing; reuses the release binaries that
# run.sh builds (SKIP_BUILD=1 skips the build). Same pinning as run.sh: proxy and
# upstream on PROXY_CPUS, load generator on LOAD_CPUS.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DURATION=${DURATION:-15}
PROTO=${PROTO:-h1}
PROXY_CPUS=${PROXY_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}
PORT_BASE=${PORT_BASE:-18100}
OUT_DIR=${OUT_DIR:-$REPO/target/bench-profile}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
UPSTREAM_PORT=$((PORT_BASE + 80))
PROXY_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 0))

log() { printf '== %s\n' "$*" >&2; }
. "$REPO/examples/bench/servers.sh"
need_apt linux-perf perf
need_apt wrk wrk
need_apt nghttp2-client h2load
need_apt curl curl
if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$TARGET_DIR/release/sluice-proxy" ]; then
    (cd "$REPO" && cargo build --release -p sluice-proxy -p sluice-bench)
fi

bench_workdir sluice-profile

if [ -n "${PLAIN:-}" ]; then
    ROUTE=""
    BACKENDS="upstream: { addresses: [\"127.0.0.1:$UPSTREAM_PORT\"] }"
else
    ROUTE="      timeout: 2s
      rateLimit: { perSecond: 1000000, burst: 100000 }
      retry: { attempts: 2, on: [connect-failure, refused-stream, gateway-error], perTryTimeout: 500ms,
               budget: { ratio: 0.2, minPerSecond: 10 } }
      circuitBreaker: { consecutiveFailures: 5, failureRate: { percent: 50, window: 30s, minRequests: 20 },
                        openFor: 10s, halfOpenRequests: 2 }
      split:
        - weights: { stable: 90, canary: 10 }"
    BACKENDS="stable: { addresses: [\"127.0.0.1:$UPSTREAM_PORT\"] }
    canary: { addresses: [\"127.0.0.1:$UPSTREAM_PORT\"] }"
fi
cat >"$WORK/policy.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: profile, namespace: bench }
spec:
  host: 127.0.0.1
  backends:
    $BACKENDS
  routes:
    - name: all
$ROUTE
YAML

setsid taskset -c "$PROXY_CPUS" "$TARGET_DIR/release/bench-upstream" --listen "127.0.0.1:$UPSTREAM_PORT" &
PIDS+=("$!")
# h2load does not reconnect after the GOAWAY Sluice sends after 10,000 streams by default.
setsid taskset -c "$PROXY_CPUS" "$TARGET_DIR/release/sluice-proxy" run --worker-threads 1 \
    --h2-max-streams-per-connection 4294967295 \
    --outbound "127.0.0.1:$PROXY_PORT" --admin "127.0.0.1:$ADMIN_PORT" --no-inbound \
    --policy "$WORK/policy.yaml" --log-level warn >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
for _ in $(seq 200); do
    curl -fsS -o /dev/null "http://127.0.0.1:$PROXY_PORT/" 2>/dev/null && break
    kill -0 "$PROXY_PID" || { cat "$WORK/proxy.log" >&2; exit 1; }
    sleep 0.05
done

mkdir -p "$OUT_DIR"
URL=http://127.0.0.1:$PROXY_PORT/
if [ "$PROTO" = h1 ]; then
    taskset -c "$LOAD_CPUS" wrk -t1 -c16 -d"$((DURATION + 2))s" "$URL" >"$OUT_DIR/load.txt" &
else
    taskset -c "$LOAD_CPUS" h2load -t1 -c4 -m4 -D"$((DURATION + 2))" "$URL" >"$OUT_DIR/load.txt" &
fi
LOAD_PID=$!
sleep 1
log "sampling sluice-proxy (pid $PROXY_PID) for ${DURATION}s"
perf record -F 1999 -g -o "$OUT_DIR/perf.data" -p "$PROXY_PID" -- sleep "$DURATION" 2>"$OUT_DIR/perf-record.log"
wait "$LOAD_PID"
{
    echo "# $(date -u '+%Y-%m-%d %H:%M') UTC, $PROTO, $([ -n "${PLAIN:-}" ] && echo 'one plain route' || echo 'full governance stack'), ${DURATION}s"
    grep -E 'Requests/sec|req/s' "$OUT_DIR/load.txt" || true
    echo
    echo "## by shared object"
    perf report -i "$OUT_DIR/perf.data" --stdio --no-children --sort dso --percent-limit 0.5 2>/dev/null | grep -v '^$'
    echo
    echo "## by symbol (self time)"
    perf report -i "$OUT_DIR/perf.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.7 2>/dev/null | grep -v '^$'
    echo
    echo "## by where the symbol lives (BENCHMARKS.md's rows)"
    perf report -i "$OUT_DIR/perf.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0 2>/dev/null \
        | python3 "$REPO/examples/bench/profile_groups.py"
} >"$OUT_DIR/report.txt"
cat "$OUT_DIR/report.txt"
log "perf data in $OUT_DIR/perf.data; report in $OUT_DIR/report.txt"
