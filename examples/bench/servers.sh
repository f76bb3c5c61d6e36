# Sourced by the bench scripts: servers started in the background and stopped, at exit,
# by the PIDs recorded here (never by name). `bench_workdir PREFIX` makes WORK (removed at
# exit) and sets the trap; `start` needs PROXY_CPUS.

PIDS=()
bench_cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}

bench_workdir() { # prefix
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    trap bench_cleanup EXIT
}

ports_free() { # first, last
    for port in $(seq "$1" "$2"); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port $port is already in use; pick other ports with PORT_BASE=..." >&2
            exit 1
        fi
    done
}

# Starts a server pinned to the proxy cores; `setsid` and `taskset` exec, so $! is the
# server itself. Sets STARTED_PID.
start() { # name, command...
    local name=$1; shift
    setsid taskset -c "$PROXY_CPUS" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

wait_http() { # url, [curl options...]
    local url=$1; shift
    for _ in $(seq 400); do
        for pid in "${PIDS[@]}"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                echo "a server (pid $pid) exited early; its logs:" >&2
                tail -n 20 "$WORK"/*.log >&2
                exit 1
            fi
        done
        if curl -fsS -o /dev/null "$@" "$url" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "no answer from $url" >&2; tail -n 20 "$WORK"/*.log >&2; exit 1
}

# Replaces what stands between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in DOC with
# the text of SUMMARY and, after it, a paragraph of markdown (the plot).
record_section() { # doc, name, summary file, markdown
    python3 - "$@" <<'PY'
import sys
doc, name, summary, after = sys.argv[1:]
text = open(doc).read()
begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
if begin not in text or end not in text:
    sys.exit(f"{doc} has no {begin} ... {end} section")
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
open(doc, "w").write(head + begin + "\n" + open(summary).read() + "\n" + after + "\n\n" + end + tail)
PY
}
