#!/usr/bin/env bash
# Sluice latency / CPU benchmark: direct vs via Sluice vs via nginx, in alternating rounds.
#
#   examples/bench/run.sh                 # oha at a fixed rate (installs oha once, ~11 min)
#   TOOL=wrk examples/bench/run.sh        # wrk, closed loop at max rate (no install wait)
#
# Knobs (environment): TOOL=oha|wrk  ROUNDS=3  DURATION=10  (seconds per run)
#   RATE=2000 (oha -q, requests/s in total)  CONNS=16  OUT=<markdown file>
#   PORT_BASE=18000  SKIP_BUILD=1 (reuse the release binary)
#
# One upstream (nginx, one process, answering a 20-byte body) serves all three paths:
#   direct  client → upstream
#   sluice  client → sluice-proxy outbound (policy: host bench → upstream) → upstream
#   nginx   client → nginx reverse proxy (one process, upstream keepalive) → upstream
# For each run it records requests, p50, p99, req/s, and the proxy's CPU time per request
# (utime+stime from /proc/PID/stat before and after); at the end the proxies' peak RSS
# (VmHWM). The machine is shared and noisy: medians over rounds and CPU per request are
# the figures that decide; tails are printed for information.
set -euo pipefail

TOOL=${TOOL:-oha}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
RATE=${RATE:-2000}
CONNS=${CONNS:-16}
PORT_BASE=${PORT_BASE:-18000}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${OUT:-$REPO/examples/bench/results-$TOOL.md}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
PROXY_BIN=$TARGET_DIR/release/sluice-proxy

UPSTREAM_PORT=$((PORT_BASE + 80))
NGINX_PROXY_PORT=$((PORT_BASE + 81))
SLUICE_PORT=$((PORT_BASE + 1))
SLUICE_ADMIN=$((PORT_BASE + 0))

log() { printf '== %s\n' "$*" >&2; }

# --- tools, installed once and reused ------------------------------------------------
need_apt() { # package, command
    if ! command -v "$2" >/dev/null 2>&1; then
        log "installing $1"
        if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$1" >/dev/null
    fi
}
need_apt nginx-light nginx
need_apt python3 python3
case "$TOOL" in
    wrk) need_apt wrk wrk ;;
    oha)
        export PATH="$HOME/.cargo/bin:$PATH"
        if ! command -v oha >/dev/null 2>&1; then
            log "installing oha into ~/.cargo/bin (once; about 11 minutes on 2 cores)"
            cargo install oha --locked
        fi ;;
    *) echo "TOOL must be oha or wrk" >&2; exit 2 ;;
esac
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# --- build ----------------------------------------------------------------------------
if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$PROXY_BIN" ]; then
    log "building the release proxy"
    (cd "$REPO" && cargo build --release -p sluice-proxy --bin sluice-proxy)
fi

# --- servers, stopped by the PIDs recorded here -------------------------------------
WORK=$(mktemp -d /tmp/sluice-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

nginx_conf() { # name, body of the server block
    mkdir -p "$WORK/$1"
    cat >"$WORK/$1/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/$1;
    proxy_temp_path $WORK/$1;
    fastcgi_temp_path $WORK/$1;
    uwsgi_temp_path $WORK/$1;
    scgi_temp_path $WORK/$1;
    keepalive_requests 1000000;
    $2
}
CONF
}

nginx_conf upstream "server { listen 127.0.0.1:$UPSTREAM_PORT; location / { return 200 \"hello from upstream\n\"; } }"
nginx_conf proxy "upstream up { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
    server { listen 127.0.0.1:$NGINX_PROXY_PORT; location / {
        proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"

cat >"$WORK/policy.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: bench, namespace: bench }
spec:
  host: bench
  backends:
    upstream: { addresses: ["127.0.0.1:$UPSTREAM_PORT"] }
  routes:
    - name: all
YAML

for port in "$UPSTREAM_PORT" "$NGINX_PROXY_PORT" "$SLUICE_PORT" "$SLUICE_ADMIN"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is already in use; pick other ports with PORT_BASE=..." >&2
        exit 1
    fi
done

setsid "$NGINX" -e "$WORK/upstream/error.log" -c "$WORK/upstream/nginx.conf" &
UPSTREAM_PID=$!; PIDS+=("$UPSTREAM_PID")
setsid "$NGINX" -e "$WORK/proxy/error.log" -c "$WORK/proxy/nginx.conf" &
NGINX_PID=$!; PIDS+=("$NGINX_PID")
setsid "$PROXY_BIN" run --outbound "127.0.0.1:$SLUICE_PORT" --admin "127.0.0.1:$SLUICE_ADMIN" \
    --no-inbound --policy "$WORK/policy.yaml" --log-level warn >"$WORK/sluice.log" 2>&1 &
SLUICE_PID=$!; PIDS+=("$SLUICE_PID")

wait_http() { # url, [Host header]
    for _ in $(seq 200); do
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || { echo "server $pid exited early; logs in $WORK" >&2; cat "$WORK"/*/error.log "$WORK/sluice.log" >&2; exit 1; }
        done
        if curl -fsS -o /dev/null -H "Host: ${2:-bench}" "$1" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "no answer from $1" >&2; cat "$WORK/sluice.log" >&2; exit 1
}
wait_http "http://127.0.0.1:$UPSTREAM_PORT/"
wait_http "http://127.0.0.1:$NGINX_PROXY_PORT/"
wait_http "http://127.0.0.1:$SLUICE_ADMIN/ready"
wait_http "http://127.0.0.1:$SLUICE_PORT/"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK)

# --- load -----------------------------------------------------------------------------
# Prints: requests p50_ms p99_ms req_per_s non2xx
load() { # url
    if [ "$TOOL" = oha ]; then
        local fmt=(--output-format json)
        oha --help 2>&1 | grep -q -- '--output-format' || fmt=(-j)
        oha -z "${DURATION}s" -q "$RATE" -c "$CONNS" --no-tui "${fmt[@]}" -H 'Host: bench' "$1" \
            >"$WORK/load.json"
        python3 - "$WORK/load.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]; p = d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
total = sum(codes.values())
print(total, p.get("p50", 0) * 1000, p.get("p99", 0) * 1000, s.get("requestsPerSec", 0), total - ok)
PY
    else
        wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H 'Host: bench' "$1" >"$WORK/load.txt"
        python3 - "$WORK/load.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
def pct(p):
    m = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s)\s*$" % p, t, re.M)
    return ms(*m.groups())
reqs = int(re.search(r"(\d+) requests in", t).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
errs = int(m.group(1)) if m else 0
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
if m:
    errs += sum(int(g) for g in m.groups())
print(reqs, pct(50), pct(99), rps, errs)
PY
    fi
}

RAW=$WORK/raw.tsv
: >"$RAW"
for round in $(seq "$ROUNDS"); do
    for target in direct sluice nginx; do
        case $target in
            direct) url="http://127.0.0.1:$UPSTREAM_PORT/"; pid="" ;;
            sluice) url="http://127.0.0.1:$SLUICE_PORT/"; pid=$SLUICE_PID ;;
            nginx)  url="http://127.0.0.1:$NGINX_PROXY_PORT/"; pid=$NGINX_PID ;;
        esac
        before=0; [ -n "$pid" ] && before=$(cpu_ticks "$pid")
        read -r reqs p50 p99 rps errs < <(load "$url")
        after=0; [ -n "$pid" ] && after=$(cpu_ticks "$pid")
        cpu_us=$(python3 -c "print(f'{($after-$before)*1e6/$CLK_TCK/max($reqs,1):.1f}' if '$pid' else '-')")
        log "round $round $target: $reqs req, p50 ${p50} ms, p99 ${p99} ms, ${rps} req/s, proxy CPU ${cpu_us} µs/req, errors $errs"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$target" "$reqs" "$p50" "$p99" "$rps" "$cpu_us" "$errs" >>"$RAW"
    done
done

SLUICE_HWM=$(hwm_kib "$SLUICE_PID")
NGINX_HWM=$(hwm_kib "$NGINX_PID")

# --- report ---------------------------------------------------------------------------
python3 - "$RAW" "$OUT" "$TOOL" "$ROUNDS" "$DURATION" "$RATE" "$CONNS" "$SLUICE_HWM" "$NGINX_HWM" <<'PY'
import statistics as st, sys, datetime, platform, os
raw, out, tool, rounds, duration, rate, conns, s_hwm, n_hwm = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(raw) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r[1], []).append(r)
def med(t, i):
    vals = [float(r[i]) for r in by[t] if r[i] != "-"]
    return st.median(vals) if vals else None
mode = (f"oha, fixed rate {rate} req/s, {conns} connections" if tool == "oha"
        else f"wrk -t1 -c{conns} (closed loop, max rate; no fixed rate)")
lines = []
lines.append(f"### {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC — {mode}, {rounds} rounds × {duration}s, alternating")
lines.append("")
lines.append(f"Machine: {os.cpu_count()} CPUs, {platform.platform()}; load generator, proxy and upstream share them.")
lines.append("")
lines.append("| path | p50 ms (median) | p50 vs direct | p99 ms (median, informational) | req/s (median) | proxy CPU µs/req (median) | peak RSS | non-2xx |")
lines.append("|---|---|---|---|---|---|---|---|")
d50 = med("direct", 3)
for t, hwm in (("direct", None), ("sluice", s_hwm), ("nginx", n_hwm)):
    p50, p99, rps, cpu = med(t, 3), med(t, 4), med(t, 5), med(t, 6)
    errs = sum(int(r[7]) for r in by[t])
    ratio = f"{p50 / d50:.2f}×" if d50 else "-"
    cpu_s = f"{cpu:.1f}" if cpu is not None else "-"
    rss = f"{int(hwm) / 1024:.1f} MiB" if hwm else "-"
    lines.append(f"| {t} | {p50:.3f} | {ratio} | {p99:.3f} | {rps:.0f} | {cpu_s} | {rss} | {errs} |")
s50, n50 = med("sluice", 3), med("nginx", 3)
lines.append("")
lines.append(f"Sluice p50 / nginx p50: {s50 / n50:.2f}×. Added p50 over direct: Sluice {s50 - d50:.3f} ms, nginx {n50 - d50:.3f} ms.")
lines.append("")
lines.append("Every round:")
lines.append("")
lines.append("| round | path | requests | p50 ms | p99 ms | req/s | proxy CPU µs/req | non-2xx |")
lines.append("|---|---|---|---|---|---|---|---|")
for r in rows:
    lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {float(r[3]):.3f} | {float(r[4]):.3f} | {float(r[5]):.0f} | {r[6]} | {r[7]} |")
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
PY
log "results written to $OUT"
