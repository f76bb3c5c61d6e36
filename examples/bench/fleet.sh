#!/usr/bin/env bash
# Fleet-wide rate limits (`rateLimit.scope: fleet`) against local ones, and what they
# cost Redis. Parts (PARTS, default all four):
#   overhead   p50 and proxy CPU per request through one Sluice outbound proxy with a
#              local limit and with a fleet limit (Redis on loopback), limits far above
#              the load so nothing is refused; wrk, HTTP/1.1, alternating in ROUNDS rounds
#   commands   Redis commands per second per proxy during the fleet runs above
#              (INFO commandstats: EVALSHA calls, PINGs; one proxy, one hot key)
#   accuracy   3 proxies with uneven load (8, 4 and 1 connections) for ACCURACY_SECS
#              against one fleet limit of 1000/s (burst 1000, --fleet-size 3): admitted
#              against the budget perSecond x t + burst
#   memory     Redis memory for 1M distinct keys written by the proxy's own script
#              (proxy/src/fleet/bucket.lua) through redis-cli --pipe, each bucket
#              drained so it stays for its whole expiry
#
#   examples/bench/fleet.sh                 # the recorded run (into BENCHMARKS.md)
#   QUICK=1 examples/bench/fleet.sh         # a try: 1 round, short, results under target/
#   PARTS=memory examples/bench/fleet.sh    # one part (RECORD then writes only it)
#
# Knobs: ROUNDS (3) DURATION (10 s per wrk run) ACCURACY_SECS (30) CONNS (16)
# KEYS_N (1000000) PROXY_CPUS (0) LOAD_CPUS (1) PORT_BASE (18300; uses +0..+20)
# PROFILE (release; `demo` builds without LTO, faster, and says so in the record)
# PROXY_BIN (default: the PROFILE's sluice-proxy) SKIP_BUILD=1 RECORD (1 unless QUICK)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    ROUNDS=${ROUNDS:-1}; DURATION=${DURATION:-3}; ACCURACY_SECS=${ACCURACY_SECS:-5}
    KEYS_N=${KEYS_N:-100000}; OUT_DIR=${OUT_DIR:-$REPO/target/bench-quick/fleet}
    RECORD=${RECORD:-0}
else
    ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-10}; ACCURACY_SECS=${ACCURACY_SECS:-30}
    KEYS_N=${KEYS_N:-1000000}; OUT_DIR=${OUT_DIR:-$REPO/examples/bench/results/fleet}
    RECORD=${RECORD:-1}
fi
PARTS=${PARTS:-"overhead commands accuracy memory"}
CONNS=${CONNS:-16}
PROXY_CPUS=${PROXY_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}
PORT_BASE=${PORT_BASE:-18300}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
PROFILE=${PROFILE:-release}
PROXY_BIN=${PROXY_BIN:-$TARGET_DIR/$PROFILE/sluice-proxy}
UPSTREAM_BIN=$TARGET_DIR/$PROFILE/bench-upstream
has() { [[ " $PARTS " == *" $1 "* ]]; }
needs_proxy() { has overhead || has commands || has accuracy; }
log() { printf '== %s\n' "$*" >&2; }

# shellcheck source=servers.sh
source "$REPO/examples/bench/servers.sh"
bench_workdir sluice-fleet-bench
mkdir -p "$OUT_DIR"
ports_free "$PORT_BASE" $((PORT_BASE + 20))

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
needs_proxy && { command -v wrk >/dev/null || missing+=(wrk); }
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if needs_proxy && { [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$PROXY_BIN" ]; }; then
    log "building the proxy and upstream ($PROFILE profile)"
    (cd "$REPO" && cargo build --profile "$PROFILE" -p sluice-proxy --bin sluice-proxy \
        && cargo build --profile "$PROFILE" -p sluice-bench --bin bench-upstream)
fi

REDIS_PORT=$PORT_BASE
start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK"
for _ in $(seq 200); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
SUMMARY=$OUT_DIR/summary.md
: >"$SUMMARY"

# --- proxies ----------------------------------------------------------------------------
policy() { # file, perSecond, burst, scope
    cat >"$1" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: bench, namespace: bench }
spec:
  host: bench
  backends:
    up: { addresses: ["127.0.0.1:$((PORT_BASE + 1))"] }
  routes:
    - name: api
      rateLimit: { perSecond: $2, burst: $3, key: { header: x-tenant }, scope: $4 }
YAML
}
proxy() { # name, index, policy file, extra flags...
    local name=$1 i=$2 file=$3; shift 3
    start "$name" "$PROXY_BIN" run --worker-threads 1 --no-inbound --policy "$file" \
        --outbound "127.0.0.1:$((PORT_BASE + 10 + i))" --admin "127.0.0.1:$((PORT_BASE + 15 + i))" "$@"
    wait_http "http://127.0.0.1:$((PORT_BASE + 15 + i))/ready"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
stop_pid() { # pid: stops one server started here and forgets it
    local keep=() p
    kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
WRK_LUA=$WORK/tenant.lua
echo 'wrk.headers["Host"] = "bench"; wrk.headers["x-tenant"] = "acme"' >"$WRK_LUA"
wrk_run() { # port, conns, seconds, out
    taskset -c "$LOAD_CPUS" wrk -t1 -c "$2" -d "${3}s" --latency -s "$WRK_LUA" \
        "http://127.0.0.1:$1/" >"$4"
}

if needs_proxy; then
    start upstream "$UPSTREAM_BIN" --listen "127.0.0.1:$((PORT_BASE + 1))"
    sleep 0.2
fi

RAW=$OUT_DIR/overhead.csv
if has overhead || has commands; then
    echo "round,scope,requests,seconds,p50_us,cpu_us_per_req,evalsha,ping" >"$RAW"
    policy "$WORK/local.yaml" 1000000 1000000 local
    policy "$WORK/fleet.yaml" 1000000 1000000 fleet
    for round in $(seq "$ROUNDS"); do
        for scope in local fleet; do
            if [ "$scope" = fleet ]; then
                proxy p-$scope-$round 0 "$WORK/fleet.yaml" --redis-url "redis://127.0.0.1:$REDIS_PORT"
            else
                proxy p-$scope-$round 0 "$WORK/local.yaml"
            fi
            pid=$STARTED_PID
            wrk_run $((PORT_BASE + 10)) 4 1 /dev/null   # warm-up
            rcli config resetstat >/dev/null
            before=$(cpu_ticks "$pid")
            wrk_run $((PORT_BASE + 10)) "$CONNS" "$DURATION" "$WORK/wrk.txt"
            after=$(cpu_ticks "$pid")
            stats=$(rcli info commandstats)
            stop_pid "$pid"
            python3 - "$WORK/wrk.txt" "$before" "$after" "$(getconf CLK_TCK)" "$round" "$scope" "$DURATION" "$stats" >>"$RAW" <<'PY'
import re, sys
text, before, after, hz, rnd, scope, secs, stats = sys.argv[1:]
text = open(text).read()
n = int(re.search(r"(\d+) requests in", text).group(1))
m = re.search(r"50%\s+([\d.]+)(us|ms|s)", text)
p50 = float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
cpu = (int(after) - int(before)) / int(hz) * 1e6 / n
calls = lambda c: int((re.search(rf"cmdstat_{c}:calls=(\d+)", stats) or [0, 0])[1])
print(f"{rnd},{scope},{n},{secs},{p50:.0f},{cpu:.1f},{calls('evalsha')},{calls('ping')}")
PY
        done
    done
    python3 - "$RAW" >>"$SUMMARY" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med = lambda s, k: statistics.median(float(r[k]) for r in rows if r["scope"] == s)
rate = lambda s: statistics.median(int(r["requests"]) / float(r["seconds"]) for r in rows if r["scope"] == s)
print("| one proxy, 1 worker thread, wrk HTTP/1.1 | local limit | fleet limit (Redis) | fleet vs local |")
print("|---|---|---|---|")
lp, fp = med("local", "p50_us"), med("fleet", "p50_us")
lc, fc = med("local", "cpu_us_per_req"), med("fleet", "cpu_us_per_req")
print(f"| p50 (µs, median of rounds) | {lp:.0f} | {fp:.0f} | {100 * (fp - lp) / lp:+.1f} % |")
print(f"| proxy CPU per request (µs) | {lc:.1f} | {fc:.1f} | {100 * (fc - lc) / lc:+.1f} % |")
print(f"| requests/s | {rate('local'):.0f} | {rate('fleet'):.0f} | |")
ev = [int(r["evalsha"]) / float(r["seconds"]) for r in rows if r["scope"] == "fleet"]
pg = [int(r["ping"]) / float(r["seconds"]) for r in rows if r["scope"] == "fleet"]
print(f"| Redis commands/s per proxy (one hot key, 100 ms interval) | | {statistics.median(ev) + statistics.median(pg):.1f} (EVALSHA {statistics.median(ev):.1f}) | at {rate('fleet'):.0f} req/s |")
print()
PY
fi

if has accuracy; then
    log "accuracy: 3 proxies, ${ACCURACY_SECS}s"
    rcli flushall >/dev/null
    policy "$WORK/acc.yaml" 1000 1000 fleet
    for i in 0 1 2; do
        proxy acc-$i $i "$WORK/acc.yaml" --redis-url "redis://127.0.0.1:$REDIS_PORT" --fleet-size 3
    done
    conns=(8 4 1)
    start_ns=$(date +%s%N)
    loads=()
    for i in 0 1 2; do
        wrk_run $((PORT_BASE + 10 + i)) "${conns[$i]}" "$ACCURACY_SECS" "$WORK/acc-$i.txt" &
        loads+=($!)
    done
    wait "${loads[@]}"
    end_ns=$(date +%s%N)
    python3 - "$start_ns" "$end_ns" "$WORK"/acc-{0,1,2}.txt >>"$SUMMARY" <<'PY'
import re, sys
start, end, *files = sys.argv[1:]
t = (int(end) - int(start)) / 1e9
admitted = []
for f in files:
    text = open(f).read()
    n = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    admitted.append(n - int(bad.group(1) if bad else 0))
budget = 1000 * t + 1000
total = sum(admitted)
print(f"Accuracy: 3 proxies (8, 4, 1 connections), one fleet limit of 1000/s, burst 1000, "
      f"{t:.1f} s: admitted {total} ({', '.join(map(str, admitted))}) against a budget of "
      f"{budget:.0f} = **{100 * total / budget:.1f} %** (goal 90–110 %).")
print()
PY
fi

if has memory; then
    log "memory: $KEYS_N keys"
    rcli flushall >/dev/null
    sha=$(rcli script load "$(cat "$REPO/proxy/src/fleet/bucket.lua")")
    before=$(rcli info memory | awk -F: '/^used_memory:/{print $2+0}')
    python3 - "$sha" "$KEYS_N" <<'PY' | rcli --pipe >"$WORK/pipe.txt"
import hashlib, sys
sha, n = sys.argv[1], int(sys.argv[2])
out = sys.stdout.buffer
def cmd(*args):
    b = [f"*{len(args)}\r\n".encode()]
    for a in args:
        a = a.encode()
        b.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(b)
for i in range(n):
    key = "sluice:rl:" + hashlib.sha256(i.to_bytes(8, "big")).hexdigest()[:32]
    # 1/s with a burst of 1000, all taken: the bucket stays ~1000 s, as a drained one would.
    out.write(cmd("EVALSHA", sha, "1", key, "1", "1000", "0", "1000"))
PY
    keys=$(rcli dbsize)
    after=$(rcli info memory | awk -F: '/^used_memory:/{print $2+0}')
    python3 - "$before" "$after" "$keys" >>"$SUMMARY" <<'PY'
import sys
before, after, keys = map(int, sys.argv[1:])
print(f"Redis memory: {keys} distinct keys written by the bucket script take "
      f"**{(after - before) / 2**20:.0f} MiB** ({(after - before) / keys:.0f} bytes per key; "
      f"Redis 7 `used_memory`, keys as `sluice:rl:<32 hex>` hashes of two fields).")
print()
PY
fi

cat "$SUMMARY"
if [ "$RECORD" = 1 ]; then
    record_section "$REPO/BENCHMARKS.md" fleet-results "$SUMMARY" \
        "Parts in this run: $PARTS. $(date -u +%Y-%m-%d), $(nproc) cores, $(redis-server --version | awk '{print $3}'), profile $PROFILE."
fi
