#!/usr/bin/env bash
# What one request costs, counted rather than timed, so the figures do not move with how
# busy the machine is: user-space instructions (valgrind's cachegrind, no cache
# simulation), system calls and context switches (perf's tracepoints), for Sluice's
# full governance stack, its plain route and nginx, over HTTP/1.1 and HTTP/2. A timed
# run (run.sh) says what the machine did; this says what each proxy asked of it, and
# is what an A/B of a small change can still read when other work shares the cores.
#
#   examples/bench/count.sh                        # every system, both protocols
#   SYSTEMS="sluice-full" PROTOCOLS=h1 examples/bench/count.sh
#   BASELINE_BIN=/path/to/old/sluice-proxy SYSTEMS="sluice-full sluice-full-base" ...
#
# Instructions: each system runs twice under cachegrind, serving N1 and then N2
# requests (the same connections: 16 for HTTP/1.1, 4 x 4 streams for HTTP/2), and the
# count per request is (Ir(N2) - Ir(N1)) / (N2 - N1), so start-up, connection set-up
# and shutdown cancel out. `cg_diff` of the two runs gives the same difference per
# function; the report groups it by crate (profile_groups.py's groups).
# System calls: the proxy runs natively at a fixed rate (RATE, default 5,000 req/s,
# run.sh's rate) for SYSCALL_REQUESTS requests while `perf stat` counts
# raw_syscalls:sys_enter, the calls by name and context switches of the process.
#
# Knobs: SYSTEMS ("sluice-full sluice nginx", plus nginx-full (run.sh's), and sluice-base /
# sluice-full-base with BASELINE_BIN)  PROTOCOLS ("h1 h2")  N1 (2000)  N2 (12000)  RATE (5000)
# SYSCALL_REQUESTS (25000)  PORT_BASE (18200)  OUT_DIR (target/bench-count)
# PROXY_BIN (default the release build)  SKIP_BUILD=1
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SYSTEMS=${SYSTEMS:-"sluice-full sluice nginx"}
PROTOCOLS=${PROTOCOLS:-"h1 h2"}
N1=${N1:-2000}
N2=${N2:-12000}
RATE=${RATE:-5000}
SYSCALL_REQUESTS=${SYSCALL_REQUESTS:-25000}
PORT_BASE=${PORT_BASE:-18200}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
OUT_DIR=${OUT_DIR:-$TARGET_DIR/bench-count}
PROXY_BIN=${PROXY_BIN:-$TARGET_DIR/release/sluice-proxy}
UPSTREAM_BIN=$TARGET_DIR/release/bench-upstream
PROXY_CPUS=${PROXY_CPUS:-0}
LOAD_CPUS=${LOAD_CPUS:-1}
UPSTREAM_PORT=$((PORT_BASE + 80))
PROXY_PORT=$((PORT_BASE + 1))
ADMIN_PORT=$((PORT_BASE + 0))

log() { printf '== %s\n' "$*" >&2; }
. "$REPO/examples/bench/servers.sh"
need_apt valgrind valgrind
need_apt linux-perf perf
need_apt nginx-light nginx
need_apt curl curl
export PATH="$HOME/.cargo/bin:$PATH"
command -v oha >/dev/null || { echo "oha is needed (run.sh installs it)" >&2; exit 1; }
if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$PROXY_BIN" ] || [ ! -x "$UPSTREAM_BIN" ]; then
    (cd "$REPO" && cargo build --release -p sluice-proxy -p sluice-bench)
fi
case " $SYSTEMS " in *" sluice-base "* | *" sluice-full-base "*)
    [ -x "${BASELINE_BIN:-}" ] || { echo "the -base systems need BASELINE_BIN" >&2; exit 2; } ;;
esac
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

bench_workdir sluice-count
ports_free "$PORT_BASE" $((PORT_BASE + 99))
mkdir -p "$OUT_DIR"

start upstream "$UPSTREAM_BIN" --listen "127.0.0.1:$UPSTREAM_PORT"
wait_http "http://127.0.0.1:$UPSTREAM_PORT/"

# The policies and the nginx of run.sh.
bench_policies "$WORK" "$UPSTREAM_PORT"
mkdir -p "$WORK/nginx"
bench_nginx_conf "$WORK/nginx" off 1 "$PROXY_PORT" $((PROXY_PORT + 1)) "$UPSTREAM_PORT"
mkdir -p "$WORK/nginx-full"
bench_nginx_conf "$WORK/nginx-full" off 1 "$PROXY_PORT" $((PROXY_PORT + 1)) "$UPSTREAM_PORT" full

# Starts SYSTEM under the command prefix given (valgrind, or nothing); sets SERVER_PID.
start_system() { # system, prefix...
    local system=$1; shift
    case $system in
        nginx | nginx-full) start "$system" "$@" "$NGINX" -p "$WORK/$system" -c "$WORK/$system/nginx.conf" ;;
        *)
            local bin=$PROXY_BIN policy=$WORK/plain.yaml
            case $system in *-base) bin=$BASELINE_BIN ;; esac
            case $system in sluice-full*) policy=$WORK/full.yaml ;; esac
            start "$system" "$@" "$bin" run --worker-threads 1 \
                --h2-max-streams-per-connection 4294967295 --outbound "127.0.0.1:$PROXY_PORT" \
                --admin "127.0.0.1:$ADMIN_PORT" --no-inbound --policy "$policy" --log-level warn ;;
    esac
    SERVER_PID=$STARTED_PID
}
url_of() { # system, protocol
    if [[ $1 == nginx* ]] && [ "$2" = h2 ]; then echo "http://127.0.0.1:$((PROXY_PORT + 1))/"
    else echo "http://127.0.0.1:$PROXY_PORT/"; fi
}
load() { # protocol, url, oha options...
    local proto=$1 url=$2; shift 2
    local conns=(-c 16)
    [ "$proto" = h2 ] && conns=(--http2 -c 4 -p 4)
    taskset -c "$LOAD_CPUS" oha --no-tui "${conns[@]}" "$@" "$url" >"$WORK/oha.txt" 2>&1
    grep -Eq 'Success rate:[[:space:]]+100.00%' "$WORK/oha.txt" || { cat "$WORK/oha.txt" >&2; exit 1; }
}
stop_server() { # and forget it, so wait_http does not take it for a crash
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    local kept=() pid
    for pid in "${PIDS[@]}"; do [ "$pid" = "$SERVER_PID" ] || kept+=("$pid"); done
    PIDS=("${kept[@]}")
}

CSV=$OUT_DIR/counts.csv
echo "system,protocol,instructions_per_request,syscalls_per_request,context_switches_per_request" >"$CSV"
for proto in $PROTOCOLS; do
    for system in $SYSTEMS; do
        url=$(url_of "$system" "$proto")
        declare -A IR=()
        for n in "$N1" "$N2"; do
            out=$OUT_DIR/cachegrind.$system.$proto.$n
            start_system "$system" valgrind --tool=cachegrind --cache-sim=no \
                --cachegrind-out-file="$out" --log-file="$WORK/valgrind.log"
            wait_http "$url" $([ "$proto" = h2 ] && echo --http2-prior-knowledge)
            load "$proto" "$url" -n "$n"
            stop_server
            IR[$n]=$(awk '/^summary:/ {print $2}' "$out")
        done
        cg_diff "$OUT_DIR/cachegrind.$system.$proto.$N1" "$OUT_DIR/cachegrind.$system.$proto.$N2" \
            >"$OUT_DIR/diff.$system.$proto" 2>/dev/null
        per_ir=$(( (IR[$N2] - IR[$N1]) / (N2 - N1) ))

        start_system "$system"
        wait_http "$url" $([ "$proto" = h2 ] && echo --http2-prior-knowledge)
        load "$proto" "$url" -n 2000
        perf stat -x, -o "$WORK/perf.txt" -p "$SERVER_PID" \
            -e raw_syscalls:sys_enter,context-switches \
            -e 'syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_readv' \
            -e 'syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto' \
            -e 'syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_epoll_ctl' \
            -e 'syscalls:sys_enter_futex,syscalls:sys_enter_sched_yield,syscalls:sys_enter_clock_gettime' &
        perf_pid=$!
        sleep 0.5
        load "$proto" "$url" -n "$SYSCALL_REQUESTS" -q "$RATE"
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
        stop_server
        count() { awk -F, -v e="$1" '$3 == e {print $1}' "$WORK/perf.txt"; }
        per_sys=$(python3 -c "print(f'{$(count raw_syscalls:sys_enter) / $SYSCALL_REQUESTS:.2f}')")
        per_cs=$(python3 -c "print(f'{$(count context-switches) / $SYSCALL_REQUESTS:.2f}')")
        by_name=$(awk -F, -v n="$SYSCALL_REQUESTS" '$3 ~ /^syscalls:sys_enter_/ && $1 > 0 {
            sub("syscalls:sys_enter_", "", $3); printf "%s %.2f; ", $3, $1 / n }' "$WORK/perf.txt")
        log "$proto $system: $per_ir instructions, $per_sys system calls ($by_name), $per_cs context switches per request"
        echo "$system,$proto,$per_ir,$per_sys,$per_cs" >>"$CSV"
        echo "$system $proto: $by_name" >>"$OUT_DIR/syscalls.txt"
    done
done
log "per request: $CSV; per function: $OUT_DIR/diff.SYSTEM.PROTO (cg_annotate it, or count_groups.py)"
column -s, -t "$CSV"
