#!/usr/bin/env python3
"""What a held connection costs a proxy in resident memory, by what it carried.

For each proxy (Sluice's release build, optionally a baseline build, and nginx when it
is installed) and each kind of connection, a fresh proxy process is started, COUNT
client connections are opened to it and each is used as its kind says, then all are
held open while the proxy's resident memory is read; the figure is the growth divided
by COUNT. Kinds:

  silent   connected, nothing sent (a pre-opened pool, a slow or idle client)
  small    one GET answered with 20 bytes, then kept alive
  large    one GET answered with 1 MiB, then kept alive
  upload   one POST of 1 MiB answered with 20 bytes, then kept alive

A proxy whose connections keep what their largest message needed grows with the
traffic's history, not with what is in flight; this shows it.

    examples/bench/conn_memory.py                 # Sluice and nginx, 2,000 each
    BASELINE_BIN=/path/to/old/sluice-proxy COUNT=5000 examples/bench/conn_memory.py

Knobs (environment): PROXY_BIN (default target/release/sluice-proxy), BASELINE_BIN,
COUNT (2000), KINDS ("silent small large upload"), PORT_BASE (18300), NGINX (0 skips it),
SETTLE (3, seconds between the last answer and the reading).
"""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROXY_BIN = os.environ.get("PROXY_BIN", os.path.join(REPO, "target/release/sluice-proxy"))
BASELINE_BIN = os.environ.get("BASELINE_BIN")
COUNT = int(os.environ.get("COUNT", "2000"))
KINDS = os.environ.get("KINDS", "silent small large upload").split()
PORT_BASE = int(os.environ.get("PORT_BASE", "18300"))
SETTLE = float(os.environ.get("SETTLE", "3"))
UPSTREAM_PORT = PORT_BASE
LARGE = 1 << 20
SMALL = b"hello from upstream\n"


async def answer(reader, writer):
    """The upstream: 1 MiB for /large, 20 bytes otherwise; request bodies read whole."""
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            length = 0
            while True:
                header = await reader.readline()
                if header in (b"\r\n", b""):
                    break
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            body = b"x" * LARGE if b" /large " in line else SMALL
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    writer.close()


def start_upstream():
    ready = threading.Event()

    async def serve():
        server = await asyncio.start_server(answer, "127.0.0.1", UPSTREAM_PORT, backlog=4096)
        ready.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    ready.wait(10)


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on 127.0.0.1:{port}")


def resident_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def use(conn, kind):
    """Sends the kind's request on `conn` and reads its whole answer."""
    if kind == "silent":
        return
    if kind == "upload":
        conn.sendall(
            b"POST /upload HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: %d\r\n\r\n" % LARGE
            + b"y" * LARGE
        )
    else:
        conn.sendall(b"GET /%s HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n" % kind.encode())
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = conn.recv(65536)
        if not chunk:
            raise RuntimeError("closed before the answer's head")
        got += chunk
    head, body = got.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = conn.recv(1 << 20)
        if not chunk:
            raise RuntimeError("closed before the answer's end")
        body += chunk


def measure(port, pid, kind):
    before = resident_kib(pid)
    conns = []
    try:
        for _ in range(COUNT):
            conn = socket.create_connection(("127.0.0.1", port))
            use(conn, kind)
            conns.append(conn)
        # Let the proxy settle what the last answers left behind; Sluice parks a kept-alive
        # HTTP/1 connection after a second of quiet, so the wait is longer than that.
        time.sleep(SETTLE)
        after = resident_kib(pid)
    finally:
        for conn in conns:
            conn.close()
    return (after - before) / COUNT


def sluice(binary, port, workdir):
    policy = os.path.join(workdir, "policy.yaml")
    with open(policy, "w") as f:
        f.write(
            "apiVersion: sluice.dev/v1alpha1\nkind: RoutePolicy\n"
            "metadata: { name: conn-memory, namespace: bench }\nspec:\n  host: 127.0.0.1\n"
            f'  backends:\n    upstream: {{ addresses: ["127.0.0.1:{UPSTREAM_PORT}"] }}\n'
            "  routes:\n    - name: all\n"
        )
    proc = subprocess.Popen(
        [binary, "run", "--worker-threads", "1", "--outbound", f"127.0.0.1:{port}",
         "--admin", f"127.0.0.1:{port + 1}", "--no-inbound", "--policy", policy,
         "--log-level", "warn"],
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc, proc.pid


def nginx(port, workdir):
    # nginx's worker runs as an unprivileged user and keeps request bodies on disk there.
    os.chmod(workdir, 0o755)
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"worker_processes 1;\ndaemon off;\npid {workdir}/nginx.pid;\n"
            f"error_log {workdir}/error.log;\nevents {{ worker_connections {COUNT * 2 + 100}; }}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {workdir}/body;\n"
            f"  proxy_temp_path {workdir}/proxy;\n"
            f"  upstream up {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 16; }}\n"
            f"  server {{\n    listen 127.0.0.1:{port};\n    client_max_body_size 10m;\n"
            '    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }\n'
            "  }\n}\n"
        )
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", workdir], stderr=subprocess.DEVNULL)
    wait_port(port)
    worker = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return proc, int(worker[0])


def main():
    systems = [("sluice", lambda p, d: sluice(PROXY_BIN, p, d))]
    if BASELINE_BIN:
        systems.append(("sluice-base", lambda p, d: sluice(BASELINE_BIN, p, d)))
    if os.environ.get("NGINX", "1") != "0" and shutil.which("nginx"):
        systems.append(("nginx", nginx))
    start_upstream()
    rows = {}
    port = PORT_BASE + 10
    for name, start in systems:
        for kind in KINDS:
            with tempfile.TemporaryDirectory(prefix="conn-memory-") as workdir:
                proc, pid = start(port, workdir)
                try:
                    rows[(name, kind)] = measure(port, pid, kind)
                finally:
                    proc.terminate()
                    proc.wait(10)
            print(f"{name} {kind}: {rows[(name, kind)]:.1f} KiB per connection", file=sys.stderr)
            port += 2
    print(f"\n{COUNT} connections held per measurement; resident memory growth per connection (KiB)\n")
    print("| proxy | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for name, _ in systems:
        print(f"| {name} | " + " | ".join(f"{rows[(name, k)]:.1f}" for k in KINDS) + " |")


if __name__ == "__main__":
    main()
