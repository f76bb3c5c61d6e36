#!/usr/bin/env python3
"""Sends GETs one after another on one keep-alive connection for a while and prints the
latency distribution on one line (ms). One request at a time, so a proxy thread held up
for X ms shows as a request of about X ms: what push_stall.sh looks for."""

import http.client
import sys
import time


def main() -> None:
    host, port, vhost, duration = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    conn = http.client.HTTPConnection(host, port)
    latencies = []
    errors = 0
    end = time.perf_counter() + duration
    while (start := time.perf_counter()) < end:
        conn.request("GET", "/", headers={"Host": vhost})
        resp = conn.getresponse()
        resp.read()
        errors += resp.status != 200
        latencies.append((time.perf_counter() - start) * 1000)
    latencies.sort()
    n = len(latencies)

    def q(p: float) -> float:
        return latencies[min(n - 1, int(p * n))]

    over = lambda ms: sum(1 for x in latencies if x > ms)  # noqa: E731
    print(
        f"{n} {errors} {q(0.5):.3f} {q(0.99):.3f} {q(0.999):.3f} {latencies[-1]:.1f} {over(5)} {over(20)}"
    )


if __name__ == "__main__":
    main()
