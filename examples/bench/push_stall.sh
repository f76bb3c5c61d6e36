#!/usr/bin/env bash
# Policy pushes under load, one worker: how long a proxy running `--worker-threads 1`
# holds requests up while it takes a snapshot of a large mesh. A control plane serves
# FILES × POLICIES policies of ROUTES routes each (every route with a timeout, retries
# and a breaker) plus one route to the upstream; the proxy (pinned with the upstream to
# one core) follows it, and a client on the other core sends requests one after another
# on one connection for DURATION seconds, while a file is edited every 2 s (each edit a
# push of the whole set) or, in the `quiet` rows, not at all. A request held up X ms by
# the proxy shows as one of about X ms, so the maximum and the count above 20 ms tell.
#
#   examples/bench/push_stall.sh                         # PROXY_BIN, built from here
#   BASELINE_BIN=/path/to/old/sluice-proxy examples/bench/push_stall.sh   # both, alternating
#
# Knobs: ROUNDS (2) DURATION (20) FILES (20) POLICIES (50) ROUTES (10) PORT_BASE (15900)
# PROFILE (demo) SKIP_BUILD=1 PROXY_CPUS (0) CLIENT_CPUS (1)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROUNDS=${ROUNDS:-2}; DURATION=${DURATION:-20}
FILES=${FILES:-20}; POLICIES=${POLICIES:-50}; ROUTES=${ROUTES:-10}
PORT_BASE=${PORT_BASE:-15900}
PROFILE=${PROFILE:-demo}
PROXY_CPUS=${PROXY_CPUS:-0}; CLIENT_CPUS=${CLIENT_CPUS:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
if [ "$PROFILE" = dev ]; then PROFILE_DIR=debug; else PROFILE_DIR=$PROFILE; fi
BIN=$TARGET_DIR/$PROFILE_DIR
PROXY_BIN=${PROXY_BIN:-$BIN/sluice-proxy}
BASELINE_BIN=${BASELINE_BIN:-}

# shellcheck source=servers.sh
source "$REPO/examples/bench/servers.sh"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$REPO" && cargo build --profile "$PROFILE" -p sluice-proxy -p sluice-control-plane -p sluice-bench)
fi
UPSTREAM=$((PORT_BASE)); GRPC=$((PORT_BASE + 1)); CP_ADMIN=$((PORT_BASE + 2))
OUTBOUND=$((PORT_BASE + 3)); ADMIN=$((PORT_BASE + 4))
ports_free "$PORT_BASE" "$ADMIN"
bench_workdir sluice-push-stall

# The policies: one file per FILES, and app.yaml routing host `app` to the upstream.
python3 - "$WORK/policies" "$FILES" "$POLICIES" "$ROUTES" "$UPSTREAM" <<'PY'
import os, sys
d, files, policies, routes, upstream = sys.argv[1], *map(int, sys.argv[2:6])
os.makedirs(d)
route = ("    - name: r{r}\n      match: {{ path: {{ prefix: /r{r} }} }}\n      timeout: 2s\n"
         "      retry: {{ attempts: 2 }}\n      circuitBreaker: {{ consecutiveFailures: 5, openFor: 10s }}\n")
for f in range(files):
    docs = [
        f"apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{ name: p{f}-{p}, namespace: bench }}\n"
        f"spec:\n  host: h{f}-{p}.bench\n  backends:\n    b: {{ addresses: [\"127.0.0.1:9\"] }}\n  routes:\n"
        + "".join(route.format(r=r) for r in range(routes))
        for p in range(policies)
    ]
    with open(os.path.join(d, f"f{f}.yaml"), "w") as out:
        out.write("---\n".join(docs))
with open(os.path.join(d, "app.yaml"), "w") as out:
    out.write("apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\nmetadata: { name: app, namespace: bench }\n"
              f"spec:\n  host: app\n  backends:\n    up: {{ addresses: [\"127.0.0.1:{upstream}\"] }}\n  routes:\n    - name: all\n")
PY

start upstream "$BIN/bench-upstream" --listen "127.0.0.1:$UPSTREAM"
# The control plane's work for a push is not what is measured: it runs beside the client.
setsid taskset -c "$CLIENT_CPUS" "$BIN/sluice-control-plane" --policy-dir "$WORK/policies" \
    --grpc "127.0.0.1:$GRPC" --admin "127.0.0.1:$CP_ADMIN" --plaintext --log-level warn \
    >"$WORK/control-plane.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$CP_ADMIN/ready"

# One measurement: the proxy `$1` for DURATION seconds, editing f0.yaml every 2 s if $2.
measure() { # proxy binary, push (0/1)
    start proxy "$1" run --control-plane "http://127.0.0.1:$GRPC" \
        --outbound "127.0.0.1:$OUTBOUND" --admin "127.0.0.1:$ADMIN" --no-inbound \
        --worker-threads 1 --node-id bench --log-level warn
    local proxy=$STARTED_PID editor=
    wait_http "http://127.0.0.1:$ADMIN/ready"
    wait_http "http://127.0.0.1:$OUTBOUND/" -H 'Host: app'
    if [ "$2" = 1 ]; then
        (
            for i in $(seq $((DURATION / 2 - 1))); do
                sleep 2
                sed -i "0,/timeout: [23]s/s//timeout: $((i % 2 + 2))s/" "$WORK/policies/f0.yaml"
            done
        ) &
        editor=$!
    fi
    taskset -c "$CLIENT_CPUS" python3 "$REPO/examples/bench/push_client.py" \
        127.0.0.1 "$OUTBOUND" app "$DURATION"
    if [ -n "$editor" ]; then wait "$editor"; fi
    # Every edit reached the proxy: it serves the control plane's last version.
    local served='' want
    want=$(curl -fsS "http://127.0.0.1:$CP_ADMIN/proxies" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
    for _ in $(seq 100); do
        served=$(curl -fsS "http://127.0.0.1:$ADMIN/config" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
        if [ "$served" = "$want" ]; then break; fi
        sleep 0.05
    done
    if [ "$served" != "$want" ]; then echo "the proxy serves $served, not $want" >&2; exit 1; fi
    kill "$proxy"; wait "$proxy" 2>/dev/null || true
    local kept=() pid
    for pid in "${PIDS[@]}"; do if [ "$pid" != "$proxy" ]; then kept+=("$pid"); fi; done
    PIDS=("${kept[@]}")
}

printf '| proxy | pushes | requests | p50 ms | p99 ms | p99.9 ms | max ms | > 5 ms | > 20 ms |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
builds=("this:$PROXY_BIN")
if [ -n "$BASELINE_BIN" ]; then builds=("baseline:$BASELINE_BIN" "${builds[@]}"); fi
for round in $(seq "$ROUNDS"); do
    for push in 1 0; do
        for build in "${builds[@]}"; do
            measure "${build#*:}" "$push" >"$WORK/row"
            read -r n errors p50 p99 p999 max over5 over20 <"$WORK/row"
            if [ "$errors" != 0 ]; then echo "$errors requests failed" >&2; exit 1; fi
            label=quiet; if [ "$push" = 1 ]; then label="every 2 s"; fi
            printf '| %s (round %s) | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "${build%%:*}" "$round" "$label" "$n" "$p50" "$p99" "$p999" "$max" "$over5" "$over20"
        done
    done
done
