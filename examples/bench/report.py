#!/usr/bin/env python3
"""Turns the measurements of examples/bench/run.sh into summary.csv (for the plot) and
summary.md (for BENCHMARKS.md): medians over rounds, latency added over the direct path
in the same round, ratios against Envoy, and the goals with a verdict each."""

import argparse
import csv
import statistics
from collections import defaultdict

# The goals (BENCHMARKS.md): full-stack throughput on one worker at least nginx's (stretch
# 1.3x), CPU per request at most 1.2x nginx's, at most 12 MiB resident at peak under load.
THROUGHPUT_GOAL = 1.0
THROUGHPUT_STRETCH = 1.3
CPU_GOAL = 1.2
RSS_GOAL_MIB = 12.0
PROTO_NAME = {"h1": "HTTP/1.1", "h2": "HTTP/2"}


def num(v):
    return float(v) if v not in ("", None) else None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def ratio(v, base):
    if v is None or base is None or base <= 0 or v < 0:
        return "–"
    return f"{v / base:.2f}×"


def main():
    ap = argparse.ArgumentParser()
    for flag in ("raw", "rss", "out-dir", "started", "rounds", "duration", "rates", "conns",
                 "h2", "proxy-cpus", "load-cpus", "workers", "load-before", "load-after", "versions",
                 "machine", "split", "command"):
        ap.add_argument("--" + flag, default="")
    a = ap.parse_args()
    rates = a.rates.split()
    workers = a.workers or "1"

    rows = list(csv.DictReader(open(a.raw)))
    rss = {r["system"]: int(r["vmhwm_kib"]) / 1024 for r in csv.DictReader(open(a.rss))}
    protos, systems = [], []
    for r in rows:
        if r["proto"] not in protos:
            protos.append(r["proto"])
        if r["system"] not in systems:
            systems.append(r["system"])
    order = ["direct", "sluice", "sluice-base", "sluice-full", "sluice-full-base", "envoy", "nginx", "nginx-full", "hop-plain", "hop-mtls"]
    systems.sort(key=lambda s: order.index(s) if s in order else len(order))

    # (round, proto, test, system) -> row
    at = {(r["round"], r["proto"], r["test"], r["system"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    # (proto, system, metric) -> median
    m = {}
    errors = defaultdict(int)
    for r in rows:
        errors[(r["proto"], r["system"])] += int(r["errors"] or 0)
    for proto in protos:
        for system in systems:
            for rate in rates:
                for p in ("p50", "p99", "p999"):
                    m[(proto, system, f"{p}_ms_{rate}")] = med(
                        num(at[k][p + "_ms"]) for k in at if k[1:] == (proto, rate, system))
                    if system != "direct":
                        # Added latency pairs each path with the direct run of the same round.
                        added = []
                        for rnd in rounds:
                            s, d = at.get((rnd, proto, rate, system)), at.get((rnd, proto, rate, "direct"))
                            if s and d and num(s[p + "_ms"]) is not None and num(d[p + "_ms"]) is not None:
                                added.append(num(s[p + "_ms"]) - num(d[p + "_ms"]))
                        m[(proto, system, f"added_{p}_ms_{rate}")] = med(added)
                m[(proto, system, f"cpu_s_per_10k_{rate}")] = med(
                    num(at[k]["cpu_s_per_10k"]) for k in at if k[1:] == (proto, rate, system))
            m[(proto, system, "max_rps")] = med(
                num(at[k]["rps"]) for k in at if k[1:] == (proto, "max", system))
            m[(proto, system, "cpu_s_per_10k_max")] = med(
                num(at[k]["cpu_s_per_10k"]) for k in at if k[1:] == (proto, "max", system))
            # Older raw files have no user-space column.
            m[(proto, system, "user_s_per_10k_max")] = med(
                num(at[k].get("user_s_per_10k")) for k in at if k[1:] == (proto, "max", system))
    for system, mib in rss.items():
        m[("all", system, "rss_mib")] = mib

    with open(f"{a.out_dir}/summary.csv", "w") as f:
        f.write("proto,system,metric,value\n")
        for (proto, system, metric), v in m.items():
            if v is not None:
                f.write(f"{proto},{system},{metric},{v:.6g}\n")

    g = lambda proto, system, metric: m.get((proto, system, metric))
    out = []
    w = out.append
    w(f"### {a.started} UTC: `{a.command}`, {a.rounds} rounds × {a.duration} s per measurement, paths alternating")
    w("")
    w(f"- Machine: {a.machine}. Load average (1, 5, 15 min) {a.load_before} before the run and "
      f"{a.load_after} after it: other work shared the machine, so compare paths within this run only.")
    w(f"- Pinning (`taskset`): the proxies and the upstream on CPU {a.proxy_cpus}, the load generator "
      f"on CPU {a.load_cpus}. Sluice with `--worker-threads {workers}`, Envoy `--concurrency {workers}`, "
      f"nginx {workers} worker process{'es' if workers != '1' else ''}, the upstream one thread.")
    w(f"- Versions: {a.versions}.")
    w(f"- Load: fixed rates with `oha -q` (latency-corrected) over {a.conns} HTTP/1.1 connections or "
      f"{a.h2.replace('x', ' connections × ')} streams of HTTP/2 (prior knowledge); maximum "
      f"throughput with `wrk -t1 -c{a.conns}` (HTTP/1.1) and `h2load -t1` with the same HTTP/2 "
      f"concurrency. Added latency = the path's percentile minus the direct path's in the same "
      f"round, median over rounds. CPU = utime + stime of the proxy process per 10,000 requests.")
    if a.split.strip():
        w(f"- The canary split was live: {a.split.strip()}")
    w("- nginx forwards HTTP/2 to the upstream as HTTP/1.1; Sluice and Envoy keep the client's protocol.")
    if any(s.startswith("hop-") for s in systems):
        w("- hop-plain and hop-mtls are two sidecars in a row (outbound, then inbound): their CPU "
          "and peak RSS are the two processes summed.")
    w("")

    proxies = [s for s in systems if s != "direct"]
    if "envoy" in systems:
        w("#### Against Envoy (value ÷ Envoy's: below 1× is better, except throughput)")
        w("")
        head = ["path", "protocol"]
        for rate in rates:
            head += [f"added p50 @{rate}", f"added p99 @{rate}"]
        head += ["max req/s", "CPU per request @max", "peak RSS"]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        for proto in protos:
            for s in proxies:
                cells = [s, PROTO_NAME.get(proto, proto)]
                for rate in rates:
                    for p in ("p50", "p99"):
                        key = f"added_{p}_ms_{rate}"
                        cells.append(ratio(g(proto, s, key), g(proto, "envoy", key)))
                cells.append(ratio(g(proto, s, "max_rps"), g(proto, "envoy", "max_rps")))
                cells.append(ratio(g(proto, s, "cpu_s_per_10k_max"), g(proto, "envoy", "cpu_s_per_10k_max")))
                cells.append(ratio(g("all", s, "rss_mib"), g("all", "envoy", "rss_mib")))
                w("| " + " | ".join(cells) + " |")
        w("")

    w("#### Figures (medians over rounds)")
    w("")
    head = ["path", "protocol"]
    for rate in rates:
        head.append(f"@{rate} req/s: added p50 / p99 / p99.9 ms")
    head += ["max req/s"]
    head += [f"CPU s/10k @{rate}" for rate in rates] + ["CPU s/10k @max", "peak RSS MiB", "errors"]
    w("| " + " | ".join(head) + " |")
    w("|" + "---|" * len(head))
    for proto in protos:
        for s in systems:
            cells = [s, PROTO_NAME.get(proto, proto)]
            for rate in rates:
                if s == "direct":
                    cells.append("(absolute) " + " / ".join(fmt(g(proto, s, f"{p}_ms_{rate}")) for p in ("p50", "p99", "p999")))
                else:
                    cells.append(" / ".join(fmt(g(proto, s, f"added_{p}_ms_{rate}")) for p in ("p50", "p99", "p999")))
            cells.append(fmt(g(proto, s, "max_rps"), 0))
            cells += [fmt(g(proto, s, f"cpu_s_per_10k_{rate}"), 2) for rate in rates]
            cells.append(fmt(g(proto, s, "cpu_s_per_10k_max"), 2))
            cells.append(fmt(g("all", s, "rss_mib"), 1) if s != "direct" else "–")
            cells.append(str(errors[(proto, s)]))
            w("| " + " | ".join(cells) + " |")
    w("")
    w("p99 and p99.9 on these shared cores move by milliseconds between rounds; p50, CPU per "
      "request, maximum throughput and peak RSS are the figures that decide.")
    w("")

    if workers != "1" and "nginx" in systems:
        # Goal 5: several workers at a fixed rate, CPU per request beside nginx's.
        w(f"#### CPU per request with {workers} workers beside nginx with {workers}")
        w("")
        w("| path | protocol | rate | CPU µs per request | ÷ nginx's |")
        w("|---|---|---|---|---|")
        for proto in protos:
            for rate in rates:
                n = g(proto, "nginx", f"cpu_s_per_10k_{rate}")
                for s in proxies:
                    v = g(proto, s, f"cpu_s_per_10k_{rate}")
                    us = None if v is None else v * 100
                    w(f"| {s} | {PROTO_NAME.get(proto, proto)} | {rate} | {fmt(us, 1)} | {ratio(v, n)} |")
        w("")
    elif "sluice-full" in systems and "nginx" in systems:
        w("#### Goals")
        w("")
        w("| goal | measured | met |")
        w("|---|---|---|")
        # A goal is judged on the median of per-round ratios (ab.py's way): rounds pair the
        # two paths in the same minute, so a round the whole machine ran slow in moves both.
        # The medians of values are shown beside them.
        def paired(proto, key):
            ratios = []
            for rnd in rounds:
                s, n = at.get((rnd, proto, "max", "sluice-full")), at.get((rnd, proto, "max", "nginx"))
                if s and n and num(s[key]) and num(n[key]):
                    ratios.append(num(s[key]) / num(n[key]))
            return med(ratios), ratios

        def per_round(ratios):
            return ", ".join(f"{x:.2f}" for x in ratios)

        cmp, ok_all, stretch = [], True, True
        for proto in protos:
            v, n = g(proto, "sluice-full", "max_rps"), g(proto, "nginx", "max_rps")
            r, ratios = paired(proto, "rps")
            ok = r is not None and r >= THROUGHPUT_GOAL
            ok_all &= ok
            stretch &= ok and r >= THROUGHPUT_STRETCH
            of_values = f" ({v / n:.2f}x)" if v and n else ""
            cmp.append(f"{PROTO_NAME.get(proto, proto)} {fmt(v, 0)} vs nginx {fmt(n, 0)} req/s{of_values}, "
                       f"per round {fmt(r, 2)}x ({per_round(ratios)}){'' if ok else ' ✗'}")
        verdict = "yes, and the 1.3x stretch" if stretch else ("yes" if ok_all else "no")
        w(f"| Full-stack maximum throughput on one worker at least nginx's on one worker (stretch 1.3x) | "
          f"{'; '.join(cmp)} | {verdict} |")
        cmp, ok_all = [], True
        for proto in protos:
            v, n = g(proto, "sluice-full", "cpu_s_per_10k_max"), g(proto, "nginx", "cpu_s_per_10k_max")
            r, ratios = paired(proto, "cpu_s_per_10k")
            ok = r is not None and r <= CPU_GOAL
            ok_all &= ok
            of_values = f" ({v / n:.2f}x)" if v and n else ""
            cmp.append(f"{PROTO_NAME.get(proto, proto)} {fmt(v, 2)} vs nginx {fmt(n, 2)} s/10k at maximum{of_values}, "
                       f"per round {fmt(r, 2)}x{'' if ok else ' ✗'}")
        w(f"| Full-stack CPU per request at most 1.2x nginx's | {'; '.join(cmp)} | {'yes' if ok_all else 'no'} |")
        cmp, ok_all = [], True
        for s in ("sluice", "sluice-full"):
            v = g("all", s, "rss_mib")
            ok = v is not None and v <= RSS_GOAL_MIB
            ok_all &= ok
            cmp.append(f"{s} {fmt(v, 1)} MiB")
        w(f"| Peak RSS at most 12 MiB under load | {'; '.join(cmp)} | {'yes' if ok_all else 'no'} |")
        cmp = []
        for proto in protos:
            for rate in rates:
                key = f"added_p50_ms_{rate}"
                cmp.append(f"{PROTO_NAME.get(proto, proto)} @{rate}: {fmt(g(proto, 'sluice-full', key))} vs "
                           f"{fmt(g(proto, 'nginx', key))} ms")
        w(f"| Added p50, full stack beside nginx (reported) | {'; '.join(cmp)} | reported |")
        w("")
        # Where CPU per request goes at maximum: the kernel's share (the same sockets and
        # system calls for every proxy) apart from the proxy's own code.
        split = []
        for proto in protos:
            v, n = g(proto, "sluice-full", "cpu_s_per_10k_max"), g(proto, "nginx", "cpu_s_per_10k_max")
            vu, nu = g(proto, "sluice-full", "user_s_per_10k_max"), g(proto, "nginx", "user_s_per_10k_max")
            if None in (v, n, vu, nu):
                continue
            split.append(f"{PROTO_NAME.get(proto, proto)} user space {fmt(vu * 100, 1)} vs {fmt(nu * 100, 1)} µs "
                         f"({ratio(vu, nu)}), kernel {fmt((v - vu) * 100, 1)} vs {fmt((n - nu) * 100, 1)} µs "
                         f"({ratio(v - vu, n - nu)})")
        if split:
            w(f"CPU per request at maximum, full stack vs nginx: {'; '.join(split)}.")
            w("")
        # The goals compare the full stack with nginx doing none of it; nginx given the
        # same policy, as far as it has one, shows what that governance costs nginx.
        beside = []
        for proto in protos:
            v, n = g(proto, "sluice-full", "max_rps"), g(proto, "nginx-full", "max_rps")
            vc, nc = g(proto, "sluice-full", "cpu_s_per_10k_max"), g(proto, "nginx-full", "cpu_s_per_10k_max")
            p, pc = g(proto, "nginx", "max_rps"), g(proto, "nginx", "cpu_s_per_10k_max")
            if None in (v, n, vc, nc):
                continue
            own = f"; nginx-full ÷ nginx {ratio(n, p)} and {ratio(nc, pc)}" if None not in (p, pc) else ""
            beside.append(f"{PROTO_NAME.get(proto, proto)} throughput {fmt(v, 0)} vs {fmt(n, 0)} req/s "
                          f"({ratio(v, n)}), CPU per request {ratio(vc, nc)}{own}")
        if beside:
            w(f"Full stack beside nginx with the same governance (nginx-full): {'; '.join(beside)}.")
            w("")

    if "hop-plain" in systems and "hop-mtls" in systems:
        w("#### The sidecar-to-sidecar hop: plaintext and mTLS")
        w("")
        w("| protocol | rate | hop added p50 / p99 ms, plaintext | hop added p50 / p99 ms, mTLS | mTLS − plaintext p50 |")
        w("|---|---|---|---|---|")
        for proto in protos:
            for rate in rates:
                pl = [g(proto, "hop-plain", f"added_{p}_ms_{rate}") for p in ("p50", "p99")]
                mt = [g(proto, "hop-mtls", f"added_{p}_ms_{rate}") for p in ("p50", "p99")]
                diff = None if pl[0] is None or mt[0] is None else mt[0] - pl[0]
                w(f"| {PROTO_NAME.get(proto, proto)} | {rate} | {fmt(pl[0])} / {fmt(pl[1])} | {fmt(mt[0])} / {fmt(mt[1])} | {fmt(diff)} |")
        w("")

    w("Every measurement of the run: `raw.csv` beside `summary.csv` in the output directory; the plot: `bench.png`.")
    w("")
    open(f"{a.out_dir}/summary.md", "w").write("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
