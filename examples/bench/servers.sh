# Sourced by the bench scripts: servers started in the background and stopped, at exit,
# by the PIDs recorded here (never by name). `bench_workdir PREFIX` makes WORK (removed at
# exit) and sets the trap; `start` needs PROXY_CPUS.

PIDS=()

# Installs a Debian package when what proves it is there (a command or a file) is missing;
# the package lists are updated once per script.
APT_UPDATED=
need_apt() { # package, file or command that proves it is there
    if ! command -v "$2" >/dev/null 2>&1 && [ ! -e "$2" ]; then
        printf '== installing %s\n' "$1" >&2
        if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
        if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$1" >/dev/null
    fi
}
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

# The policies every bench script measures: DIR/plain.yaml (one plain route) and
# DIR/full.yaml (the full governance stack), both to the upstream on 127.0.0.1:PORT.
bench_policies() { # dir, upstream port
    local WORK=$1 UPSTREAM_PORT=$2
    cat >"$WORK/plain.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: bench-plain, namespace: bench }
spec:
  host: 127.0.0.1
  backends:
    upstream: { addresses: ["127.0.0.1:$UPSTREAM_PORT"] }
  routes:
    - name: all
YAML
    cat >"$WORK/full.yaml" <<YAML
apiVersion: sluice.dev/v1alpha1
kind: RoutePolicy
metadata: { name: bench-full, namespace: bench }
spec:
  host: 127.0.0.1
  backends:
    stable: { addresses: ["127.0.0.1:$UPSTREAM_PORT"] }
    canary: { addresses: ["127.0.0.1:$UPSTREAM_PORT"] }
  routes:
    - name: all
      timeout: 2s
      rateLimit: { perSecond: 1000000, burst: 100000 }
      retry:
        attempts: 2
        on: [connect-failure, refused-stream, gateway-error]
        perTryTimeout: 500ms
        budget: { ratio: 0.2, minPerSecond: 10 }
      circuitBreaker:
        consecutiveFailures: 5
        failureRate: { percent: 50, window: 30s, minRequests: 20 }
        openFor: 10s
        halfOpenRequests: 2
      split:
        - weights: { stable: 90, canary: 10 }
YAML
}

# nginx as the bench runs it: a reverse proxy with upstream keep-alive to 127.0.0.1:UP,
# HTTP/1.1 on one port and HTTP/2 (prior knowledge, which nginx takes only on a port of
# its own) on another; writes DIR/nginx.conf, with DIR for its pid and temporary files.
# With `full` last, nginx is given what full.yaml asks of Sluice, as far as open-source
# nginx has it: a request rate limit (limit_req, 429), a per-request 90/10 split over two
# upstream blocks (split_clients on the request id), a passive breaker (max_fails,
# fail_timeout), two tries on connect failures and gateway errors with a 500 ms per-try
# timeout and 2 s in all (proxy_next_upstream*). It has no retry budget, no failure-rate
# window and no RateLimit response headers.
bench_nginx_conf() { # dir, master_process (on/off), workers, h1 port, h2 port, upstream port, [full]
    local dir=$1 NGINX_MASTER=$2 WORKERS=$3 NGINX_H1_PORT=$4 NGINX_H2_PORT=$5 UPSTREAM_PORT=$6
    local http_extra location
    if [ "${7:-}" = full ]; then
        http_extra="limit_req_zone \$server_name zone=all:1m rate=1000000r/s;
    limit_req_status 429;
    split_clients \"\${request_id}\" \$backend { 90% stable; * canary; }
    upstream stable { server 127.0.0.1:$UPSTREAM_PORT max_fails=5 fail_timeout=10s; keepalive 64; keepalive_requests 1000000; }
    upstream canary { server 127.0.0.1:$UPSTREAM_PORT max_fails=5 fail_timeout=10s; keepalive 64; keepalive_requests 1000000; }"
        location="location / {
            limit_req zone=all burst=100000 nodelay;
            proxy_pass http://\$backend; proxy_http_version 1.1; proxy_set_header Connection \"\";
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 2; proxy_next_upstream_timeout 2s;
            proxy_connect_timeout 500ms; proxy_send_timeout 500ms; proxy_read_timeout 500ms;
        }"
    else
        http_extra="upstream up { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; keepalive_requests 1000000; }"
        location='location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }'
    fi
    cat >"$dir/nginx.conf" <<CONF
daemon off;
master_process $NGINX_MASTER;
worker_processes $WORKERS;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir;
    proxy_temp_path $dir;
    fastcgi_temp_path $dir;
    uwsgi_temp_path $dir;
    scgi_temp_path $dir;
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    $http_extra
    server {
        listen 127.0.0.1:$NGINX_H1_PORT;
        listen 127.0.0.1:$NGINX_H2_PORT http2;
        $location
    }
}
CONF
}
